"""Metrics and threshold choice: the numbers the model card and `evaluate` report."""

import numpy as np
import pytest

from spamfilterd.scores import Thresholds
from trainer.crossval import on_scale_of, same_scale
from trainer.metrics import (
    can_measure,
    choose_thresholds,
    classification_metrics,
    roc_curve,
    threshold_for_fpr,
)


def test_metrics_at_a_threshold():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.6, 0.3, 0.9, 0.4, 0.8, 0.7]
    metrics = classification_metrics(labels, scores, 0.5)
    assert metrics["confusion"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert metrics["accuracy"] == 0.75
    assert metrics["precision"] == 0.75 and metrics["recall"] == 0.75 and metrics["f1"] == 0.75
    assert metrics["fpr"] == 0.25 and metrics["n"] == 8
    # The threshold is inclusive: a score equal to it is spam.
    assert classification_metrics([0], [0.5], 0.5)["confusion"]["fp"] == 1


def test_empty_ratios_are_zero_not_nan():
    metrics = classification_metrics([0, 0], [0.1, 0.2])
    assert metrics["precision"] == 0.0 and metrics["recall"] == 0.0 and metrics["f1"] == 0.0


def test_threshold_meets_the_false_positive_rate_on_the_printed_grid():
    labels = [0] * 10 + [1] * 5
    scores = [0.5 + i / 100 for i in range(10)] + [0.995] * 5  # ham 0.50 … 0.59
    zero_fp = threshold_for_fpr(labels, scores, 0.0)
    assert zero_fp == 0.591  # one grid step above the highest ham
    assert classification_metrics(labels, scores, zero_fp)["confusion"]["fp"] == 0
    one_fp = threshold_for_fpr(labels, scores, 0.1)
    assert one_fp == 0.581 and classification_metrics(labels, scores, one_fp)["confusion"]["fp"] == 1
    assert threshold_for_fpr(labels, scores, 1.0) == 0.5  # never below the argmax point
    assert threshold_for_fpr([0, 1], [0.9999, 1.0], 0.0) == 1.0


def test_can_measure_needs_one_over_max_fpr_ham():
    assert not can_measure([0] * 199 + [1] * 500, 0.005)
    assert can_measure([0] * 200, 0.005)
    assert not can_measure([0] * 1000, 0.0)


def test_thresholds_are_ordered_and_on_the_grid():
    labels = [0] * 200 + [1] * 200
    scores = [i / 1000 for i in range(200)] + [0.99] * 200  # ham up to 0.199
    thresholds = choose_thresholds(labels, scores, max_fpr=0.005, unsure_fpr=0.05)
    assert thresholds == Thresholds(spam=0.5, unsure=0.5)
    worse = choose_thresholds([0] * 20 + [1] * 5, [0.01] * 18 + [0.7, 0.93] + [0.999] * 5, 0.0, 0.05)
    assert worse == Thresholds(spam=0.931, unsure=0.701)
    for value in (worse.spam, worse.unsure):
        assert round(value, 3) == value


def test_roc_auc():
    assert roc_curve([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])[2] == pytest.approx(1.0)
    assert roc_curve([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1])[2] == pytest.approx(0.0)
    assert roc_curve([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5])[2] == pytest.approx(0.5)


def test_cross_validated_thresholds_are_carried_onto_the_final_models_scale():
    """Fold models put spam near 0.99; the shipped model, softened by its temperature, near 0.93.
    A threshold counted on the folds' own scale would flag none of its spam."""
    rng = np.random.default_rng(7)
    pool_labels = [0] * 600 + [1] * 600
    # 1 % of the ham scores high (0.95-0.97): a 0.5 % FPR needs a threshold above most of them.
    ham = [*rng.uniform(0.0, 0.3, 594), *rng.uniform(0.95, 0.97, 6)]
    pool_scores = ham + list(rng.uniform(0.98, 1.0, 600))
    final_scores = [*rng.uniform(0.0, 0.3, 74), 0.85, *rng.uniform(0.9, 0.96, 75)]

    final_labels = [0] * 75 + [1] * 75
    on_fold_scale = choose_thresholds(pool_labels, pool_scores, max_fpr=0.005)
    assert on_fold_scale.spam > max(final_scores)
    assert not same_scale((pool_labels, pool_scores), (final_labels, final_scores), 0.005)
    mapped = on_scale_of(pool_scores, final_scores)
    assert np.argsort(mapped, kind="stable").tolist() == np.argsort(pool_scores, kind="stable").tolist()
    thresholds = choose_thresholds(pool_labels, mapped, max_fpr=0.005)
    final = np.asarray(final_scores)
    flagged = final >= thresholds.spam
    assert flagged[75:].mean() >= 0.95  # the final model's spam is caught
    assert not flagged[:75].any()  # and its ham is not


def test_a_final_model_on_the_folds_scale_keeps_the_counted_threshold():
    """Validation drawn like the pool: its spam reach the threshold as often, up to sampling noise."""
    rng = np.random.default_rng(11)
    ham = [*rng.uniform(0.0, 0.3, 594), *rng.uniform(0.95, 0.97, 6)]
    spam = [*rng.uniform(0.9, 0.97, 60), *rng.uniform(0.98, 1.0, 540)]
    final_scores = [*rng.uniform(0.0, 0.3, 75), *rng.uniform(0.9, 0.97, 9), *rng.uniform(0.98, 1.0, 66)]
    labels = [0] * 600 + [1] * 600
    assert same_scale((labels, ham + spam), ([0] * 75 + [1] * 75, final_scores), 0.005)
