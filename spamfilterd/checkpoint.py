"""The checkpoint format: `model.safetensors` (weights) + `model.json` (architecture and model card).

Loading never unpickles; the weights' sha256 is recorded at save time so a truncated or swapped
file is caught before it is used.
"""

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from spamfilterd import __version__
from spamfilterd.checkpoint_layout import CARD_FILE, WEIGHTS_FILE, checkpoint_files
from spamfilterd.model import GPTConfig, GPTModel
from spamfilterd.tokenizer import TOKENIZER_NAME

FORMAT_VERSION = 1
DEFAULT_THRESHOLDS = {"spam": 0.5, "unsure": 0.5}


class CheckpointError(Exception):
    """A checkpoint is missing, damaged or does not fit its description; the message names the file."""


def save_checkpoint(model: GPTModel, out_dir: Path, card: dict) -> Path:
    """Write weights and card into `out_dir`; returns the directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; the daemon often runs as another user than the trainer
    full_card = {
        "format_version": FORMAT_VERSION,
        "spamfilterd_version": __version__,
        "name": card.get("name", out_dir.name),
        "labels": ["ham", "spam"],
        "max_tokens": model.cfg.context_length,
        "thresholds": dict(DEFAULT_THRESHOLDS),
        **card,
        "architecture": model.cfg.to_dict(),
        "n_outputs": model.n_outputs,
        "tokenizer": TOKENIZER_NAME,
        "weights_sha256": file_sha256(weights),
    }
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


def read_card(card_path: Path) -> dict:
    try:
        card = json.loads(Path(card_path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{card_path}: not a readable model card ({exc})") from exc
    if not isinstance(card, dict) or "architecture" not in card:
        raise CheckpointError(
            f"{card_path}: no 'architecture' in the model card; not a spamfilterd checkpoint"
        )
    temperature = card.get("temperature", 1.0)
    if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature <= 0:
        raise CheckpointError(
            f"{card_path}: 'temperature' must be a positive number (the trainer writes it), got "
            f"{temperature!r}; retrain, or remove the key to score without calibration"
        )
    if card.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{card_path}: format_version {card['format_version']} is newer than this spamfilterd "
            f"({__version__}) understands; upgrade spamfilterd"
        )
    return card


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[GPTModel, dict]:
    """The classifier in eval mode and its card."""
    weights, card_path = resolve_checkpoint(path)
    card = read_card(card_path)
    expected_sha = card.get("weights_sha256")
    if expected_sha and file_sha256(weights) != expected_sha:
        raise CheckpointError(
            f"{weights}: sha256 does not match {card_path} (truncated copy, or weights from another "
            f"checkpoint); copy the checkpoint directory again"
        )
    try:
        cfg = GPTConfig(**card["architecture"])
    except TypeError as exc:
        raise CheckpointError(f"{card_path}: bad 'architecture' ({exc})") from exc
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    model = GPTModel(cfg, n_outputs=card.get("n_outputs", 2))
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
