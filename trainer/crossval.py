"""Scores for choosing thresholds when the validation split is too small to measure them.

A 0.5 % false-positive rate cannot be seen on the 75 validation ham of the reference split: one
ham is already 1.3 %. The threshold would then sit just above the single highest-scoring
validation ham, wherever that outlier fell. K-fold cross-validation over train + validation
scores every one of those messages with a model that did not train on it (about 600 ham for the
reference split), and the threshold is counted on those scores instead.

The fold models are not the model that ships, though: each keeps its own epoch and temperature,
and the final model's scores can sit on another scale (an over-trained epoch softened by a large
temperature puts all its spam near 0.95, where the folds put theirs near 0.99). So the pooled
scores are carried onto the final model's scale by rank before a threshold is counted on them
(`on_scale_of`): a threshold then flags the share of messages it flagged in cross-validation.
"""

import numpy as np
import pandas as pd
from tqdm import tqdm

from trainer.data import Splits
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
