"""The training loop of the reference chapter: cross-entropy on each message's last real token,
evaluated every `eval_every` steps, accuracy after each epoch.

What a model that starts from random weights needs on top, each measured in
benchmarks/train_recipes.md: warmup + cosine, a token embedding trained only where the training
texts have tokens, and keeping the epoch that is best on validation once calibrated. The
reference recipe is `RECIPES["reference"]`; `random` is the measured best for random weights on a CPU.
"""

import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from spamfilterd.checkpoint import ModelCard
from spamfilterd.classifier import (
    SpamClassifier,
    autocast_for,
    encode_text,
    pad_batch,
    resolve_device,
    resolve_precision,
)
from spamfilterd.model import GPTEnsemble, GPTModel
from spamfilterd.tokenizer import get_tokenizer
from trainer.calibration import calibrated_nll, logit_margins
from trainer.data import Splits
from trainer.model_setup import build_model, set_trainable

SCORE_BATCH = 32
BUCKET_BATCHES = 16
SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Every knob of a run; the model card records it, so a run can be repeated exactly."""

    weights: str = "random"
    arch: str = "gpt-mini"
    trainable: str = "all"
    epochs: int | None = 5
    steps: int | None = None  # optimizer steps; when set, epochs = ceil(steps / steps per epoch)
    lr: float = 5e-5
    weight_decay: float = 0.1
    batch_size: int = 8
    warmup: float = 0.0  # fraction of all steps
    schedule: str = "constant"  # one of SCHEDULES
    dropout: float = 0.0
    max_tokens: int | None = None  # None = longest training message
    seed: int = 123
    eval_every: int = 50
    eval_batches: int = 5
    device: str = "auto"
    precision: str = "auto"
    members: int = 1  # models trained from seeds seed, seed + 1000, ... whose logits are averaged


RECIPES: dict[str, dict] = {
    # The reference chapter: AdamW 5e-5, wd 0.1, batch 8, 5 epochs, last block + final norm + head.
    "reference": {"trainable": "last-block", "epochs": 5, "lr": 5e-5},
    "random": {
        "arch": "gpt-micro",
        "trainable": "all",
        # Sized by updates, not passes: 3,000 steps of 8 are 23 epochs of the 1,045-message reference
        # split and 4 of SMS + email; the epoch kept is the best one once calibrated
        # (benchmarks/train_recipes.md, round 4).
        "epochs": None,
        "steps": 3000,
        "lr": 5e-4,
        "warmup": 0.05,
        "schedule": "cosine",
        "dropout": 0.1,
        # Measured on email: 256 tokens keep the subject, the opening and the end of 90 % of it.
        "max_tokens": 256,
        # Three averaged models: steadier from seed to seed and better calibrated than one, for 3x
        # the training time (benchmarks/train_recipes.md, round 7).
        "members": 3,
    },
}


@dataclass
class History:
    """What the plots draw: losses at each evaluation and accuracies after each epoch."""

    eval_examples: list[int] = field(default_factory=list)
    eval_epochs: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    epoch_examples: list[int] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    val_calibrated_nll: list[float] = field(default_factory=list)
    best_epoch: int = 0


MEMBER_SEED_STRIDE = 1000


@dataclass
class TrainResult:
    model: GPTModel | GPTEnsemble
    max_tokens: int
    history: History  # the first member's; the curves draw it
    train_seconds: float
    trainable_parameters: int  # of one member
    device: str
    precision: str
    temperature: float  # fitted to the (averaged) validation logits of `model`
    validation_nll: float  # calibrated, of `model`
    epochs: int
    member_epochs: list[int]  # the epoch each member kept


class EncodedSplit:
    """Token ids of one split, served in batches padded only to their own longest message."""

    def __init__(self, encoded: list[list[int]], labels: list[int]):
        self.encoded = encoded
        self.labels = labels

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, rows: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, last = pad_batch([self.encoded[row] for row in rows])
        labels = torch.tensor([self.labels[row] for row in rows], dtype=torch.long)
        return ids.to(device), last.to(device), labels.to(device)

    def shuffled(self, batch_size: int, generator: torch.Generator) -> list[list[int]]:
        """One epoch of full batches of similar length, in random order.

        Messages are shuffled, cut into windows of BUCKET_BATCHES batches, sorted by length inside
        each window and batched: mail ranges from 10 to 256+ tokens, and a batch padded to its longest
        member would otherwise waste most of its work on padding.
        """
        order = torch.randperm(len(self), generator=generator).tolist()
        usable = len(order) - len(order) % batch_size  # drop_last, as the reference
        window = batch_size * BUCKET_BATCHES
        batches = []
        for start in range(0, usable, window):
            rows = sorted(order[start : min(start + window, usable)], key=lambda row: len(self.encoded[row]))
            batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def ordered(self, batch_size: int, limit: int | None = None):
        starts = range(0, len(self), batch_size)
        for number, start in enumerate(starts):
            if limit is not None and number >= limit:
                return
            yield list(range(start, min(start + batch_size, len(self))))


class TrainingVocabulary(nn.Module):
    """A token embedding whose trainable rows are only the tokens that occur in the training texts.

    The other ~45,000 of GPT-2's 50,257 rows get no gradient anyway, yet AdamW would read and write
    them every step, which dominates a CPU step of a small model. Unseen rows keep their values
    (dense AdamW would only shrink them by weight decay); `merged` writes the trained rows back.
    """

    def __init__(self, full: nn.Embedding, vocab: torch.Tensor):
        super().__init__()
        self.full = full.requires_grad_(False)
        self.vocab: torch.Tensor
        self.register_buffer("vocab", vocab, persistent=False)
        remap = torch.full((full.num_embeddings,), -1, dtype=torch.long, device=vocab.device)
        remap[vocab] = torch.arange(len(vocab), device=vocab.device)
        self.remap: torch.Tensor
        self.register_buffer("remap", remap, persistent=False)
        self.rows = nn.Parameter(full.weight.detach()[vocab].clone())

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        index = self.remap[token_ids]
        trained = self.rows[index.clamp(min=0)]
        return torch.where((index >= 0).unsqueeze(-1), trained, self.full(token_ids))

    def merged(self) -> nn.Embedding:
        with torch.no_grad():
            self.full.weight[self.vocab] = self.rows
        return self.full.requires_grad_(True)


def _schedule(warmup: float, schedule: str, total_steps: int):
    warmup_steps = max(1, round(warmup * total_steps)) if warmup else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def _optimizer(model: GPTModel, lr: float, weight_decay: float) -> torch.optim.AdamW:
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    # The fused kernel: on a CPU the default per-tensor AdamW spends most of a step on the embedding.
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)


def calc_loss_batch(model: GPTModel, ids: torch.Tensor, last: torch.Tensor, labels: torch.Tensor, precision):
    with autocast_for(ids.device, precision):
        logits = model(ids, last)
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def _logits(model, split: EncodedSplit, device, precision, batch_size, limit=None):
    """(logits, labels) of a split's batches in order, in eval mode; the model's mode is restored after
    (a model fitted and scored for the card stays in eval mode: dropout would blur its scores)."""
    was_training = model.training
    model.eval()
    for rows in split.ordered(batch_size, limit):
        ids, last, labels = split.batch(rows, device)
        with autocast_for(device, precision):
            logits = model(ids, last).float()
        yield logits, labels
    model.train(was_training)


def calc_loss_and_accuracy(model, split: EncodedSplit, device, precision, batch_size, limit=None):
    total_loss, correct, seen = 0.0, 0, 0
    for logits, labels in _logits(model, split, device, precision, batch_size, limit):
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=-1) == labels).sum())
        seen += len(labels)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def validation_margins(model, split: EncodedSplit, device, precision) -> np.ndarray:
    """spam-minus-ham logit of every message of a split, in order."""
    batches = _logits(model, split, device, precision, SCORE_BATCH)
    return np.concatenate([logit_margins(logits.cpu().numpy()) for logits, _ in batches])


def choose_max_tokens(encoded_lengths: list[int], requested: int | None, context_length: int) -> int:
    """The reference pads to the longest training message; the context length is the hard cap."""
    longest = max(encoded_lengths) if encoded_lengths else 1
    return min(requested or longest, context_length)


def epochs_for(config: TrainConfig, steps_per_epoch: int) -> int:
    """`steps` sizes the run by updates (so more data means fewer passes), else `epochs` as given."""
    if config.steps is not None:
        return max(1, math.ceil(config.steps / steps_per_epoch))
    if config.epochs is None:
        raise ValueError("set either epochs or steps")
    return config.epochs


@dataclass
class Encoded:
    """The splits as token ids, shared by every member of a run."""

    train_set: EncodedSplit
    val_set: EncodedSplit
    max_tokens: int


@dataclass
class Member:
    """One freshly initialised model of a run, before it is fitted."""

    model: GPTModel
    trainable_parameters: int
    device: torch.device
    precision: str


def member_seeds(config: TrainConfig) -> list[int]:
    return [config.seed + MEMBER_SEED_STRIDE * member for member in range(config.members)]


def new_member(config: TrainConfig) -> Member:
    """A model built from `config.seed`, so two runs of one seed start from the same weights."""
    torch.manual_seed(config.seed)
    # CPU kernels that sum over threads (the embedding rows' backward) otherwise let two runs of one
    # seed drift apart; the deterministic ones cost no measurable time here. warn_only: CUDA ops
    # without a deterministic version warn instead of failing.
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = resolve_device(config.device)
    # `auto` is fp32 on a CPU, which also keeps a seed's results bit-for-bit repeatable.
    precision = resolve_precision(config.precision, device)
    model = build_model(config.weights, config.arch, config.dropout).to(device)
    trainable = set_trainable(model, config.trainable)
    return Member(model, trainable, device, precision)


def encode_splits(splits: Splits, config: TrainConfig, context_length: int) -> Encoded:
    tokenizer = get_tokenizer()
    raw_train = [tokenizer.encode(text, disallowed_special=()) for text in splits.train["Text"]]
    max_tokens = choose_max_tokens([len(ids) for ids in raw_train], config.max_tokens, context_length)

    def encode(frame) -> EncodedSplit:
        texts, labels = list(frame["Text"]), [int(label) for label in frame["Label"]]
        return EncodedSplit([encode_text(tokenizer, text, max_tokens) for text in texts], labels)

    train_set, val_set = encode(splits.train), encode(splits.validation)
    if len(train_set) < config.batch_size:
        raise ValueError(
            f"{len(train_set)} training messages are fewer than one batch of {config.batch_size}"
        )
    return Encoded(train_set, val_set, max_tokens)


def train(splits: Splits, config: TrainConfig, progress: bool = True) -> TrainResult:
    """Fine-tune `config.members` models on `splits.train`, each from its own seed, and average them.

    Each member keeps the epoch that is best on validation once calibrated (`fit_member`); one
    temperature is then fitted to the members' averaged validation logits, so P(spam) is a
    probability of what ships. With one member this is the member itself. Same seed, same model
    on a CPU.
    """
    start = time.perf_counter()
    seeds = member_seeds(config)
    first = new_member(replace(config, seed=seeds[0]))
    encoded = encode_splits(splits, config, first.model.cfg.context_length)
    fitted = []
    for number, seed in enumerate(seeds):
        if len(seeds) > 1:
            tqdm.write(f"ensemble member {number + 1} of {len(seeds)} (seed {seed})")
        member = first if number == 0 else new_member(replace(config, seed=seed))
        fitted.append(fit_member(member, encoded, replace(config, seed=seed), progress))
    models = [model for model, _ in fitted]
    model: GPTModel | GPTEnsemble = models[0] if len(models) == 1 else GPTEnsemble(models).eval()
    margins = validation_margins(model, encoded.val_set, first.device, first.precision)
    nll, temperature = calibrated_nll(margins, np.asarray(encoded.val_set.labels))
    return TrainResult(
        model=model,
        max_tokens=encoded.max_tokens,
        history=fitted[0][1],
        train_seconds=time.perf_counter() - start,
        trainable_parameters=first.trainable_parameters,
        device=str(first.device),
        precision=first.precision,
        temperature=temperature,
        validation_nll=nll,
        epochs=epochs_for(config, len(encoded.train_set) // config.batch_size),
        member_epochs=[history.best_epoch for _, history in fitted],
    )


def fit_member(
    member: Member, encoded: Encoded, config: TrainConfig, progress: bool
) -> tuple[GPTModel, History]:
    """Train one model; keep the epoch that is best on validation once calibrated.

    After every epoch the whole validation split is scored and a temperature fitted to it; the
    weights of the epoch with the lowest calibrated validation NLL are kept (early stopping without
    stopping), so a run that later memorises its training set still returns its best model.
    The token embedding trains only the rows that training uses.
    """
    model, device, precision = member.model, member.device, member.precision
    train_set, val_set = encoded.train_set, encoded.val_set
    vocab = torch.tensor(sorted({token for ids in train_set.encoded for token in ids}), device=device)
    if model.tok_emb.weight.requires_grad:
        model.tok_emb = TrainingVocabulary(model.tok_emb, vocab)  # type: ignore[assignment]
    history = History()
    optimizer = _optimizer(model, config.lr, config.weight_decay)
    steps_per_epoch = len(train_set) // config.batch_size
    epochs = epochs_for(config, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(config.warmup, config.schedule, steps_per_epoch * epochs)
    )
    shuffler = torch.Generator().manual_seed(config.seed)
    val_labels = np.asarray(val_set.labels)
    best_nll, best_state = math.inf, model.state_dict()
    bar = tqdm(total=steps_per_epoch * epochs, desc="training", unit="step", disable=not progress)
    model.train()
    step = 0
    for epoch in range(1, epochs + 1):
        for rows in train_set.shuffled(config.batch_size, shuffler):
            optimizer.zero_grad(set_to_none=True)
            loss = calc_loss_batch(model, *train_set.batch(rows, device), precision)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
            if step % config.eval_every == 0:
                train_loss, _ = calc_loss_and_accuracy(
                    model, train_set, device, precision, config.batch_size, config.eval_batches
                )
                val_loss, _ = calc_loss_and_accuracy(
                    model, val_set, device, precision, config.batch_size, config.eval_batches
                )
                history.eval_examples.append(step * config.batch_size)
                history.eval_epochs.append(step / steps_per_epoch)
                history.train_loss.append(train_loss)
                history.val_loss.append(val_loss)
                bar.write(
                    f"epoch {epoch} (step {step:06d}): train loss {train_loss:.3f}, val loss {val_loss:.3f}"
                )
        _, train_accuracy = calc_loss_and_accuracy(
            model, train_set, device, precision, config.batch_size, config.eval_batches
        )
        margins = validation_margins(model, val_set, device, precision)
        nll, epoch_temperature = calibrated_nll(margins, val_labels)
        if nll < best_nll:
            best_nll, history.best_epoch = nll, epoch
            best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        history.epoch_examples.append(step * config.batch_size)
        history.train_accuracy.append(train_accuracy)
        history.val_accuracy.append(float(np.mean((margins > 0) == (val_labels == 1))))
        history.val_calibrated_nll.append(nll)
        bar.write(
            f"epoch {epoch}: train accuracy {train_accuracy:.2%} ({config.eval_batches} batches), "
            f"validation accuracy {history.val_accuracy[-1]:.2%} (all {len(val_set)}), calibrated "
            f"validation NLL {nll:.4f} at T={epoch_temperature:.2f}"
            f"{' (best so far)' if history.best_epoch == epoch else ''}"
        )
    bar.close()
    model.load_state_dict(best_state)
    if isinstance(model.tok_emb, TrainingVocabulary):
        model.tok_emb = model.tok_emb.merged()
    model.eval()
    return model, history


def score_texts(
    model: GPTModel | GPTEnsemble,
    texts: list[str],
    max_tokens: int,
    temperature: float,
    device: str,
    precision: str,
) -> list[float]:
    """P(spam) exactly as the daemon computes it, so the card's metrics are the ones users will see."""
    card = ModelCard(architecture=model.cfg.to_dict(), max_tokens=max_tokens, temperature=temperature)
    classifier = SpamClassifier(model, card, torch.device(device), precision, SCORE_BATCH)
    return classifier.score(texts)


def config_dict(config: TrainConfig) -> dict:
    return asdict(config)
