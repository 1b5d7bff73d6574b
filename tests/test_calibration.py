"""Temperature scaling and the calibration measures the model card reports."""

import numpy as np
import pytest

from trainer.calibration import (
    T_MAX,
    T_MIN,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    logit_margins,
    reliability,
)


def _sample(temperature: float, n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Margins of a model over-confident by `temperature`: the true P(spam) is sigmoid(margin / T)."""
    rng = np.random.default_rng(seed)
    margins = rng.normal(0.0, 6.0, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-margins / temperature))).astype(int)
    return margins, labels


def test_fit_recovers_the_temperature_that_made_the_data():
    for truth in (0.5, 1.0, 3.0):
        margins, labels = _sample(truth)
        assert fit_temperature(margins, labels) == pytest.approx(truth, rel=0.08)


def test_temperature_stays_in_bounds_when_validation_is_separable():
    margins = np.array([-3.0, -2.0, 2.0, 3.0])
    labels = np.array([0, 0, 1, 1])
    assert fit_temperature(margins, labels) == pytest.approx(T_MIN, rel=1e-3)
    assert fit_temperature(margins, 1 - labels) == pytest.approx(T_MAX, rel=1e-3)


def test_scaling_fixes_the_calibration_error_of_an_overconfident_model():
    margins, labels = _sample(4.0, seed=1)
    raw = 1 / (1 + np.exp(-margins))
    temperature = fit_temperature(margins, labels)
    scaled = 1 / (1 + np.exp(-margins / temperature))
    assert expected_calibration_error(labels, raw) > 0.1
    assert expected_calibration_error(labels, scaled) < 0.02
    assert brier_score(labels, scaled) < brier_score(labels, raw)


def test_reliability_bins_and_known_values():
    labels = [0, 0, 1, 1]
    scores = [0.05, 0.15, 0.95, 1.0]  # 1.0 falls into the last bin, not an eleventh
    table = reliability(labels, scores)
    assert [row["n"] for row in table] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table[9]["mean_score"] == pytest.approx(0.975) and table[9]["spam_share"] == 1.0
    assert expected_calibration_error(labels, scores) == pytest.approx((0.05 + 0.15 + 0.05) / 4)
    assert brier_score([0, 1], [0.2, 0.6]) == pytest.approx((0.04 + 0.16) / 2)
    assert list(logit_margins(np.array([[1.0, 3.0], [2.0, -1.0]]))) == [2.0, -3.0]
