"""Making P(spam) a probability: temperature scaling, and how to measure calibration.

An over-trained network is over-confident: its scores pile up at 0 and 1, and no threshold
between them means anything. Temperature scaling (Guo et al., 2017) divides the logits by one
scalar T fitted to minimise the validation negative log-likelihood: the ranking, and so the
accuracy at 0.5, is unchanged; only the confidence is corrected.
"""

from collections.abc import Sequence

import numpy as np

T_MIN, T_MAX = 0.05, 100.0  # a validation set that the model separates perfectly would push T to 0
ECE_BINS = 10


def logit_margins(logits: np.ndarray) -> np.ndarray:
    """spam logit minus ham logit: P(spam) = sigmoid(margin / T)."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits[:, 1] - logits[:, 0]


def log_losses(margins: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    """Each message's negative log-likelihood at this temperature, for paired comparisons."""
    signed = np.where(labels == 1, margins, -margins) / temperature
    return np.logaddexp(0.0, -signed)


def _nll(margins: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(np.mean(log_losses(margins, labels, temperature)))


def fit_temperature(margins: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """The T in [T_MIN, T_MAX] with the lowest NLL, by golden-section search on log T.

    The NLL is convex in 1/T, so it is unimodal in log T and the search finds the optimum.
    """
    values, truth = np.asarray(margins, dtype=np.float64), np.asarray(labels)
    low, high = np.log(T_MIN), np.log(T_MAX)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = _nll(values, truth, np.exp(a)), _nll(values, truth, np.exp(b))
    for _ in range(80):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = _nll(values, truth, np.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = _nll(values, truth, np.exp(b))
    return float(np.exp((low + high) / 2))


def calibrated_nll(
    margins: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray
) -> tuple[float, float]:
    """(NLL at the best temperature, that temperature): how good a model is once calibrated."""
    temperature = fit_temperature(margins, labels)
    return _nll(np.asarray(margins, dtype=np.float64), np.asarray(labels), temperature), temperature


def reliability(labels: Sequence[int], scores: Sequence[float], bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width bin of P(spam): messages, mean P(spam), share that is spam."""
    truth, values = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    index = np.minimum((values * bins).astype(int), bins - 1)
    table = []
    for number in range(bins):
        inside = index == number
        count = int(inside.sum())
        table.append(
            {
                "low": number / bins,
                "high": (number + 1) / bins,
                "n": count,
                "mean_score": float(values[inside].mean()) if count else None,
                "spam_share": float(truth[inside].mean()) if count else None,
            }
        )
    return table


def expected_calibration_error(labels: Sequence[int], scores: Sequence[float], bins: int = ECE_BINS) -> float:
    """ECE over P(spam) in equal-width bins: the message-weighted gap between score and spam share."""
    total = len(scores)
    if not total:
        return 0.0
    return sum(
        row["n"] / total * abs(row["mean_score"] - row["spam_share"])
        for row in reliability(labels, scores, bins)
        if row["n"]
    )


def brier_score(labels: Sequence[int], scores: Sequence[float]) -> float:
    truth, values = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    return float(np.mean((values - truth) ** 2)) if len(values) else 0.0
