"""Classification metrics at a threshold, and the thresholds a mail admin cares about.

A spam filter's costly mistake is the false positive (a real mail lost to the spam folder), so the
spam threshold is chosen on validation data for a target false-positive rate, and an `unsure`
band below it holds what a looser filter would have called spam.
"""

import math
from collections.abc import Sequence

import numpy as np

from spamfilterd.scores import DEFAULT_THRESHOLD, Thresholds, score_on_grid
from trainer.calibration import brier_score, expected_calibration_error

DEFAULT_MAX_FPR = 0.005
DEFAULT_UNSURE_FPR = 0.05


def confusion(labels: Sequence[int], scores: Sequence[float], threshold: float = 0.5) -> dict[str, int]:
    """Counts with spam (1) as the positive class; a score at or above the threshold means spam."""
    truth = np.asarray(labels, dtype=int)
    predicted = np.asarray(scores, dtype=float) >= threshold
    return {
        "tn": int(((truth == 0) & ~predicted).sum()),
        "fp": int(((truth == 0) & predicted).sum()),
        "fn": int(((truth == 1) & ~predicted).sum()),
        "tp": int(((truth == 1) & predicted).sum()),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def classification_metrics(labels: Sequence[int], scores: Sequence[float], threshold: float = 0.5) -> dict:
    """accuracy, precision, recall, f1, fpr and the confusion matrix; empty ratios are 0, not NaN."""
    counts = confusion(labels, scores, threshold)
    tp, fp, fn, tn = counts["tp"], counts["fp"], counts["fn"], counts["tn"]
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "n": tp + fp + fn + tn,
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall) if precision + recall else 0.0,
        "fpr": _ratio(fp, fp + tn),
        "confusion": counts,
        "threshold": threshold,
    }


def split_metrics(labels: Sequence[int], scores: Sequence[float], thresholds: Thresholds) -> dict:
    """What the filter does to these messages, by the daemon's verdict rule at these thresholds:
    metrics at the spam threshold, the unsure band, and calibration."""
    unsure_count = [thresholds.verdict(score) for score in scores].count("unsure")
    return {
        # Scores on the printed grid, so the counts are exactly the verdicts the daemon gives.
        **classification_metrics(labels, [score_on_grid(score) for score in scores], thresholds.spam),
        "unsure": unsure_count,
        "unsure_share": unsure_count / len(scores) if len(scores) else 0.0,
        "ece": expected_calibration_error(labels, scores),
        "brier": brier_score(labels, scores),
    }


def ham_score_to_clear(labels: Sequence[int], scores: Sequence[float], max_fpr: float) -> float | None:
    """The highest ham score that must not be flagged for at most `max_fpr` of this ham to be;
    None when every ham may be."""
    ham = np.sort(np.asarray(scores, dtype=float)[np.asarray(labels) == 0])[::-1]
    allowed = math.floor(max_fpr * len(ham) + 1e-9)
    return float(ham[allowed]) if allowed < len(ham) else None


def threshold_for_fpr(labels: Sequence[int], scores: Sequence[float], max_fpr: float) -> float:
    """The lowest threshold on the printed 0.001 grid, from 0.5 up, whose counted false-positive
    rate on these scores is at most `max_fpr`."""
    cleared = ham_score_to_clear(labels, scores, max_fpr)
    if cleared is None:
        return DEFAULT_THRESHOLD
    # One grid step above the highest ham score that must not be flagged.
    return float(min(1.0, max(DEFAULT_THRESHOLD, round(score_on_grid(cleared) + 0.001, 3))))


def can_measure(labels: Sequence[int], max_fpr: float) -> bool:
    """Whether these scores hold enough ham for one false positive to be within `max_fpr`."""
    return max_fpr > 0 and int((np.asarray(labels) == 0).sum()) * max_fpr >= 1


def choose_thresholds(
    labels: Sequence[int],
    scores: Sequence[float],
    max_fpr: float = DEFAULT_MAX_FPR,
    unsure_fpr: float = DEFAULT_UNSURE_FPR,
) -> Thresholds:
    """The thresholds, from scored ham and spam the model did not train on.

    The spam threshold never drops below 0.5: it should only ever make the filter more careful than
    the model's own argmax. The unsure threshold meets the looser `unsure_fpr` and stays between
    half the spam threshold and the spam threshold, so the band holds what the model is unsure of
    without swallowing ordinary mail.
    """
    spam = threshold_for_fpr(labels, scores, max_fpr)
    unsure = threshold_for_fpr(labels, scores, unsure_fpr)
    return Thresholds(spam, float(np.round(min(spam, max(unsure, spam / 2)), 3)))


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, float]:
    """(false-positive rates, true-positive rates, area under the curve), ties handled as one step."""
    truth = np.asarray(labels, dtype=int)
    values = np.asarray(scores, dtype=float)
    order = np.argsort(-values, kind="stable")
    truth, values = truth[order], values[order]
    distinct = np.r_[np.flatnonzero(np.diff(values)), len(values) - 1] if len(values) else np.array([], int)
    tps = np.cumsum(truth)[distinct] if len(values) else np.array([])
    fps = (distinct + 1) - tps
    positives, negatives = max(int(truth.sum()), 1), max(int((1 - truth).sum()), 1)
    tpr = np.r_[0.0, tps / positives]
    fpr = np.r_[0.0, fps / negatives]
    return fpr, tpr, float(np.trapezoid(tpr, fpr))
