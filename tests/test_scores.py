"""The printed grid: `score >= required` as a header prints it holds exactly when the verdict is spam."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamfilterd.rules import Decision
from spamfilterd.scores import Thresholds, score_on_grid, score_text, threshold_on_grid
from spamfilterd.tagging import status_headers


def test_grid_rounding():
    assert threshold_on_grid(0.99993) == 1.0
    assert threshold_on_grid(0.5) == 0.5 and threshold_on_grid(0.999) == 0.999
    assert threshold_on_grid(0.0) == 0.0
    assert score_on_grid(0.99983) == 0.999 and score_text(0.99983) == "0.999"
    assert score_on_grid(0.999) == 0.999 and score_on_grid(1.0) == 1.0


def test_the_old_contradiction_cannot_happen():
    # Card threshold 0.99993, score 0.99983: once printed `score=1.000 required=1.000 verdict=unsure`.
    assert Thresholds(spam=0.99993, unsure=0.5).verdict(0.99983) == "unsure"
    decision = Decision(verdict="unsure", score=0.99983, actions=(), rule="default")
    status = dict(status_headers(decision, threshold_on_grid(0.99993), "m"))["X-Spam-Status"]
    assert "score=0.999 required=1.000 verdict=unsure" in status


@given(
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
)
def test_printed_comparison_is_the_verdict(score, threshold):
    required = threshold_on_grid(threshold)
    verdict = Thresholds(spam=required, unsure=0.0).verdict(score)
    assert (float(score_text(score)) >= float(f"{required:.3f}")) == (verdict == "spam")


@pytest.mark.parametrize(
    ("score", "verdict"),
    [
        (1.0, "spam"),
        (0.8, "spam"),  # a threshold is inclusive
        (0.1 + 0.7, "spam"),  # 0.7999999999999999 prints as 0.800: binary noise is not a lower score
        (0.7999, "unsure"),  # prints as 0.799
        (0.5, "unsure"),
        (0.4999, "ham"),
        (0.0, "ham"),
    ],
)
def test_thresholds_verdict_on_the_grid(score, verdict):
    assert Thresholds(spam=0.8, unsure=0.5).verdict(score) == verdict


def test_thresholds_live_on_the_grid_rounded_up():
    thresholds = Thresholds(spam=0.8004, unsure=0.30001)
    assert (thresholds.spam, thresholds.unsure) == (0.801, 0.301)
    assert thresholds.verdict(0.8009) == "unsure" and thresholds.verdict(0.801) == "spam"
    assert Thresholds() == Thresholds(spam=0.5, unsure=0.5)  # no unsure band
    assert Thresholds(spam=1.01, unsure=1.01).verdict(1.0) == "ham"  # 1.01: nothing is spam
    assert Thresholds(spam=0.0, unsure=0.0).verdict(0.0) == "spam"


@pytest.mark.parametrize(
    ("spam", "unsure", "expected"),
    [
        (0.5, 0.6, "the unsure threshold 0.6 is above the spam threshold 0.5"),
        (1.5, 0.5, "expected a probability between 0 and 1.01, got 1.5"),
        (float("nan"), 0.5, "expected a finite number, got nan"),
        (0.5, True, "expected a finite number, got True"),
    ],
)
def test_bad_thresholds_say_what_is_wrong(spam, unsure, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        Thresholds(spam=spam, unsure=unsure)
