"""Scores for choosing thresholds when the validation split is too small to measure them.

A 0.5 % false-positive rate cannot be seen on the 75 validation ham of the reference split: one
ham is already 1.3 %. The threshold would then sit just above the single highest-scoring
validation ham, wherever that outlier fell. K-fold cross-validation over train + validation
scores every one of those messages with a model that did not train on it (about 600 ham for the
reference split), and the threshold is counted on those scores instead.

The fold models are not the model that ships, though: each keeps its own epoch and temperature,
and the final model's scores can sit on another scale (an over-trained epoch softened by a large
temperature puts all its spam near 0.975, just under a threshold the folds put at 0.976).
`same_scale` checks that on validation: if the final model catches clearly less validation spam
at the counted threshold than the folds caught in cross-validation, the pooled scores are carried
onto its scale by rank (`on_scale_of`) before the threshold is counted. Not always: the final
model's validation scores picked its epoch and temperature, so they are more confident than new
mail's, and a threshold carried onto them comes out stricter than it should.
"""

import math

import numpy as np
import pandas as pd
from tqdm import tqdm

from trainer.data import Splits
from trainer.metrics import threshold_for_fpr
from trainer.train import TrainConfig, score_texts, train

FOLDS = 5


def pooled(splits: Splits) -> pd.DataFrame:
    """Train and validation together: every message a threshold may be counted on."""
    return pd.concat([splits.train, splits.validation]).reset_index(drop=True)


def stratified_folds(labels, folds: int, seed: int) -> np.ndarray:
    """The fold of each message; every fold gets its share of ham and of spam."""
    truth = np.asarray(labels, dtype=int)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(truth), dtype=int)
    for label in (0, 1):
        rows = np.flatnonzero(truth == label)
        rng.shuffle(rows)
        fold_of[rows] = np.arange(len(rows)) % folds
    return fold_of


def cross_validated_scores(
    splits: Splits, config: TrainConfig, folds: int = FOLDS, progress: bool = True
) -> tuple[list[int], list[float]]:
    """(labels, calibrated P(spam)) of every train + validation message, each from the fold model
    that held it out; each fold model keeps its epoch and temperature on its held-out fold."""
    pool = pooled(splits)
    fold_of = stratified_folds(pool["Label"], folds, config.seed)
    labels: list[int] = []
    scores: list[float] = []
    for fold in range(folds):
        tqdm.write(f"cross-validation for the thresholds: fold {fold + 1} of {folds}")
        held_out, rest = pool[fold_of == fold], pool[fold_of != fold]
        result = train(Splits(rest, held_out, held_out.iloc[:0]), config, progress=progress)
        labels += [int(label) for label in held_out["Label"]]
        scores += score_texts(
            result.model,
            list(held_out["Text"]),
            result.max_tokens,
            result.temperature,
            result.device,
            result.precision,
        )
    return labels, scores


def on_scale_of(scores: list[float], final_scores: list[float]) -> list[float]:
    """`scores` carried onto the scale of `final_scores` by rank (quantile mapping).

    Each score is replaced by the final model's validation score at the same quantile, so a
    threshold counted on the result flags the same share of messages on both. Only the scale
    changes, not the order; it assumes the final model ranks messages as the fold models do and
    that validation holds ham and spam in the pool's proportion (both come from one shuffle).
    """
    pooled_sorted = np.sort(np.asarray(scores, dtype=float))
    below = np.searchsorted(pooled_sorted, scores, side="left")
    not_above = np.searchsorted(pooled_sorted, scores, side="right")
    quantiles = (below + not_above) / (2 * len(pooled_sorted))
    return [float(value) for value in np.quantile(np.asarray(final_scores, dtype=float), quantiles)]


def same_scale(
    pooled: tuple[list[int], list[float]], validation: tuple[list[int], list[float]], max_fpr: float
) -> bool:
    """Whether the final model's validation spam reach the threshold counted on the pooled scores
    about as often as the pooled spam do: its recall there may fall short of theirs by sampling
    noise (three standard errors of a binomial share, plus one message), not more."""
    threshold = threshold_for_fpr(*pooled, max_fpr)
    pooled_spam = np.asarray(pooled[1])[np.asarray(pooled[0]) == 1]
    final_spam = np.asarray(validation[1])[np.asarray(validation[0]) == 1]
    if not len(pooled_spam) or not len(final_spam):
        return True
    expected = float((pooled_spam >= threshold).mean())
    noise = 3 * math.sqrt(expected * (1 - expected) / len(final_spam)) + 1 / len(final_spam)
    return float((final_spam >= threshold).mean()) >= expected - noise
