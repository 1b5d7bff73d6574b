"""`spamfilterd-train evaluate`: a checkpoint's metrics and speed on any labelled data.

It scores through `SpamClassifier`, the daemon's own code path, at the card's spam threshold, so a
new model can be compared with the running one before it replaces it.
"""

import time
from pathlib import Path

import pandas as pd

from spamfilterd.classifier import SpamClassifier
from trainer.data import read_labelled_csv, read_mail
from trainer.errors import DataError
from trainer.metrics import split_metrics


def load_labelled(test_csv: Path | None, ham: list[Path], spam: list[Path]) -> pd.DataFrame:
    frames = []
    if test_csv is not None:
        frames.append(read_labelled_csv(test_csv))
    if ham:
        frames.append(read_mail(ham, 0)[0])
    if spam:
        frames.append(read_mail(spam, 1)[0])
    if not frames:
        raise DataError("nothing to evaluate on: give --test-csv FILE and/or --ham PATH / --spam PATH")
    frame = pd.concat(frames).reset_index(drop=True)
    if frame.empty:
        raise DataError("the evaluation data holds no messages")
    return frame


def evaluate(classifier: SpamClassifier, frame: pd.DataFrame) -> dict:
    """accuracy, precision, recall, f1, fpr, n, ece, brier, messages_per_second (+ confusion, unsure
    count, model), with the daemon's verdict rule at the card's thresholds."""
    texts, labels = list(frame["Text"]), [int(label) for label in frame["Label"]]
    started = time.perf_counter()
    scores = classifier.score(texts)
    seconds = time.perf_counter() - started
    return {
        "model": classifier.model_id,
        **split_metrics(labels, scores, classifier.thresholds),
        "messages_per_second": len(texts) / seconds if seconds > 0 else float("inf"),
        "device": str(classifier.device),
    }
