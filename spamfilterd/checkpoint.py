"""The checkpoint format: `model.safetensors` (weights) + `model.json` (architecture and model card).

Loading never unpickles; the weights' sha256 is recorded at save time so a truncated or swapped
file is caught before it is used. The card is read here and only here (`ModelCard`); torch is
imported only to save or load weights, so `check-config` reads a card without it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spamfilterd import __version__
from spamfilterd.checkpoint_layout import CARD_FILE, WEIGHTS_FILE, checkpoint_files
from spamfilterd.scores import DEFAULT_THRESHOLD, Thresholds, valid_threshold

if TYPE_CHECKING:
    import torch

    from spamfilterd.model import GPTEnsemble, GPTModel

FORMAT_VERSION = 2  # 2 added `members`; a single model is still written as 1, so 0.1 daemons read it
RETRAIN = "retrain with spamfilterd-train, or fix the value in the card"


class CheckpointError(Exception):
    """A checkpoint is missing, damaged or does not fit its description; the message names the file."""


@dataclass(frozen=True)
class ModelCard:
    """What serving needs from model.json, typed and checked; the trainer's report in the same file
    (data, metrics, history) is for people and is not read back.

    Keys newer than some cards have defaults that score those cards as they always were scored.
    """

    architecture: dict[str, Any]  # spamfilterd.model.GPTConfig's fields
    name: str = "model"
    max_tokens: int | None = None  # None: the architecture's context length
    thresholds: Thresholds = field(default_factory=Thresholds)  # the card's unsure defaults to its spam
    temperature: float = 1.0  # cards from before calibration: logits are not scaled
    n_outputs: int = 2
    members: int = 1  # models whose logits are averaged (spamfilterd.model.GPTEnsemble)
    weights_sha256: str | None = None  # None: the weights are not verified

    @property
    def model_id(self) -> str:
        """`name@sha` as headers and logs show it."""
        return f"{self.name}@{(self.weights_sha256 or 'unknown')[:12]}"

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable model card ({exc})") from exc
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> ModelCard:
        """The card in `data` (read from `path`, which errors name)."""
        if not isinstance(data, dict) or not isinstance(data.get("architecture"), dict):
            raise CheckpointError(
                f"{path}: no 'architecture' in the model card; not a spamfilterd checkpoint"
            )
        version = _typed(data, "format_version", int, 0, path, minimum=0)
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: format_version {version} is newer than this spamfilterd "
                f"({__version__}) understands; upgrade spamfilterd"
            )
        temperature = data.get("temperature", 1.0)
        if not (
            isinstance(temperature, int | float)
            and not isinstance(temperature, bool)
            and math.isfinite(temperature)
            and temperature > 0
        ):
            raise CheckpointError(
                f"{path}: 'temperature' must be a positive number (the trainer writes it), got "
                f"{temperature!r}; retrain, or remove the key to score without calibration"
            )
        return cls(
            architecture=data["architecture"],
            name=_typed(data, "name", str, "model", path),
            max_tokens=_typed(data, "max_tokens", int, None, path),
            thresholds=_thresholds(data.get("thresholds", {}), path),
            temperature=float(temperature),
            n_outputs=_typed(data, "n_outputs", int, 2, path),
            members=_typed(data, "members", int, 1, path),
            weights_sha256=_typed(data, "weights_sha256", str, None, path),
        )


def _typed(data: dict, key: str, kind: type, default: Any, path: Path, minimum: int = 1) -> Any:
    """`data[key]`, checked to be a `kind` (an int at least `minimum`); `default` when absent."""
    if key not in data:
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise CheckpointError(f"{path}: '{key}' must be a {kind.__name__}, got {value!r}; {RETRAIN}")
    if isinstance(value, int) and value < minimum:
        raise CheckpointError(f"{path}: '{key}' must be at least {minimum}, got {value!r}; {RETRAIN}")
    return value


def _thresholds(data: Any, path: Path) -> Thresholds:
    """The card's thresholds: 0.5 where it has none; without an unsure band where it has no unsure.
    An unsure threshold above the spam one only empties the band, as it always did."""
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path}: 'thresholds' must be a mapping with spam and unsure, got {data!r}; {RETRAIN}"
        )
    values = {}
    for key in ("spam", "unsure"):
        if key in data:
            try:
                values[key] = valid_threshold(data[key])
            except ValueError as exc:
                raise CheckpointError(f"{path}: 'thresholds.{key}': {exc}; {RETRAIN}") from None
    spam = values.get("spam", DEFAULT_THRESHOLD)
    return Thresholds(spam, min(values.get("unsure", spam), spam))


def save_checkpoint(model: GPTModel | GPTEnsemble, out_dir: Path, card: dict) -> Path:
    """Write weights and card into `out_dir`; returns the directory.

    `card` is the trainer's: the keys ModelCard reads plus its report. The written card is read
    back as a ModelCard first, so the trainer cannot write one the daemon refuses.
    """
    from safetensors.torch import save_file

    from spamfilterd.model import GPTEnsemble
    from spamfilterd.tokenizer import TOKENIZER_NAME

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    members = len(model.members) if isinstance(model, GPTEnsemble) else 1
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; the daemon often runs as another user than the trainer
    full_card = {
        "format_version": FORMAT_VERSION if members > 1 else 1,
        "spamfilterd_version": __version__,
        "name": out_dir.name,
        "labels": ["ham", "spam"],
        "max_tokens": model.cfg.context_length,
        "thresholds": asdict(Thresholds()),
        **card,
        "architecture": model.cfg.to_dict(),
        "n_outputs": model.n_outputs,
        "members": members,
        "tokenizer": TOKENIZER_NAME,
        "weights_sha256": file_sha256(weights),
    }
    ModelCard.from_dict(full_card, out_dir / CARD_FILE)
    tmp = out_dir / (CARD_FILE + ".tmp")
    tmp.write_text(json.dumps(full_card, indent=2, sort_keys=False) + "\n")
    tmp.replace(out_dir / CARD_FILE)
    return out_dir


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(weights, card) for a checkpoint directory, its model.json, or its .safetensors file."""
    weights, card = checkpoint_files(path)
    for needed in (weights, card):
        if not needed.is_file():
            raise CheckpointError(
                f"{needed}: file not found (a checkpoint is a directory with {WEIGHTS_FILE} and "
                f"{CARD_FILE}; train one with `spamfilterd-train --out DIR`)"
            )
    return weights, card


def load_checkpoint(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[GPTModel | GPTEnsemble, ModelCard]:
    """The classifier in eval mode and its card."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from spamfilterd.model import GPTConfig, GPTEnsemble, GPTModel

    weights, card_path = resolve_checkpoint(path)
    card = ModelCard.load(card_path)
    if card.weights_sha256 and file_sha256(weights) != card.weights_sha256:
        raise CheckpointError(
            f"{weights}: sha256 does not match {card_path} (truncated copy, or weights from another "
            f"checkpoint); copy the checkpoint directory again"
        )
    try:
        cfg = GPTConfig(**card.architecture)
    except TypeError as exc:
        raise CheckpointError(f"{card_path}: bad 'architecture' ({exc})") from exc
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    stored = len({name.split(".", 2)[1] for name in state if name.startswith("members.")}) or 1
    if stored != card.members:  # checked before building: a damaged card must not allocate 10^6 models
        raise CheckpointError(
            f"{weights}: holds {stored} member model(s), but {card_path} says 'members': "
            f"{card.members}; copy the checkpoint directory again"
        )
    members = [GPTModel(cfg, n_outputs=card.n_outputs) for _ in range(card.members)]
    model = members[0] if card.members == 1 else GPTEnsemble(members)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{weights}: weights do not match the architecture in {card_path}: {exc}"
        ) from exc
    return model.to(device).eval(), card


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
