"""Metrics and threshold choice: the numbers the model card and `evaluate` report."""

import pytest

from trainer.metrics import choose_thresholds, classification_metrics, roc_curve, threshold_for_fpr


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


def test_threshold_meets_the_false_positive_rate():
    labels = [0] * 10 + [1] * 5
    scores = [i / 100 for i in range(10)] + [0.95] * 5  # ham 0.00 … 0.09
    zero_fp = threshold_for_fpr(labels, scores, 0.0)
    assert 0.09 < zero_fp < 0.0901
    assert classification_metrics(labels, scores, zero_fp)["confusion"]["fp"] == 0
    one_fp = threshold_for_fpr(labels, scores, 0.1)
    assert classification_metrics(labels, scores, one_fp)["confusion"]["fp"] == 1
    assert threshold_for_fpr(labels, scores, 1.0) == 0.0


def test_chosen_thresholds_keep_their_order_and_floor():
    labels = [0] * 200 + [1] * 200
    scores = [i / 1000 for i in range(200)] + [0.99] * 200  # ham up to 0.199
    thresholds = choose_thresholds(labels, scores, max_fpr=0.005, unsure_fpr=0.05)
    assert thresholds["spam"] == 0.5  # never below the argmax point
    assert thresholds["spam"] / 2 <= thresholds["unsure"] <= thresholds["spam"]
    worse = choose_thresholds([0, 0, 1], [0.97, 0.2, 0.99], max_fpr=0.0)
    assert 0.97 < worse["spam"] <= 1.0 and worse["unsure"] <= worse["spam"]


def test_roc_auc():
    assert roc_curve([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])[2] == pytest.approx(1.0)
    assert roc_curve([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1])[2] == pytest.approx(0.0)
    assert roc_curve([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5])[2] == pytest.approx(0.5)
