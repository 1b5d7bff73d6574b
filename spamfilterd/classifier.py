"""`SpamClassifier`: P(spam) for texts, read from the logits of each message's last real token."""

import contextlib
from pathlib import Path

import torch

from spamfilterd.checkpoint import ModelCard, load_checkpoint
from spamfilterd.scores import Verdict
from spamfilterd.tokenizer import PAD_TOKEN_ID, get_tokenizer

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
HEAD_SHARE = 0.75  # of an over-long message's token budget, the rest goes to its end


def encode_text(tokenizer, text: str, max_tokens: int) -> list[int]:
    """Token ids of `text`, at most `max_tokens` long.

    An over-long text keeps its first 3/4 of the budget (subject and opening, where spam shows
    itself) and its last 1/4 (the last tokens are what the classifier reads; signatures and
    unsubscribe links live there), rather than silently dropping the end. `<|endoftext|>` inside a
    message is read as plain text, so a sender cannot inject the special token.
    """
    ids = tokenizer.encode(text, disallowed_special=())
    if len(ids) > max_tokens:
        head = int(max_tokens * HEAD_SHARE)
        ids = ids[:head] + ids[len(ids) - (max_tokens - head) :]
    return ids or [PAD_TOKEN_ID]


def pad_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [batch, longest] and each row's last real position [batch]."""
    longest = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), longest), PAD_TOKEN_ID, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    last = torch.tensor([len(seq) - 1 for seq in seqs], dtype=torch.long)
    return ids, last


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but no CUDA GPU is available (use 'cpu' or 'auto')")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        # benchmarks/bench_score.py: on CPU, bf16 autocast moves P(spam) by more than 0.01, so it is
        # opt-in there; CUDA GPUs with bf16 units get it by default.
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str):
    """The autocast context for a resolved precision: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class SpamClassifier:
    """A loaded checkpoint that scores texts; thread-compatible but not re-entrant (one caller at a time)."""

    def __init__(self, model, card: ModelCard, device: torch.device, precision: str, batch_size: int = 16):
        self.model = model.eval()  # scores are read without dropout, whoever built the model
        self.card = card
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.tokenizer = get_tokenizer()
        self.max_tokens = min(card.max_tokens or model.cfg.context_length, model.cfg.context_length)
        self.thresholds = card.thresholds
        # Temperature scaling (fitted by the trainer on validation data) makes P(spam) calibrated.
        self.temperature = card.temperature
        self.model_id = card.model_id

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        batch_size: int = 16,
    ) -> "SpamClassifier":
        if threads:
            torch.set_num_threads(threads)
        resolved = resolve_device(device)
        model, card = load_checkpoint(Path(path), device=resolved)
        return cls(model, card, resolved, resolve_precision(precision, resolved), batch_size)

    def score(self, texts: list[str]) -> list[float]:
        """P(spam) for each text, in order. Sorting by length keeps padding, and so work, small."""
        encoded = [encode_text(self.tokenizer, text, self.max_tokens) for text in texts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            ids, last = pad_batch([encoded[i] for i in rows])
            with torch.inference_mode(), autocast_for(self.device, self.precision):
                logits = self.model(ids.to(self.device), last)
            probabilities = torch.softmax(logits.float() / self.temperature, dim=-1)[:, 1].tolist()
            for row, probability in zip(rows, probabilities, strict=True):
                scores[row] = probability
        return scores

    def classify(self, text: str) -> tuple[Verdict, float]:
        """("spam" | "unsure" | "ham", P(spam)) at the model card's thresholds, by the daemon's rule."""
        score = self.score([text])[0]
        return self.thresholds.verdict(score), score
