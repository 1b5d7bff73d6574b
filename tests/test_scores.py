"""The printed grid: `score >= required` as a header prints it holds exactly when the verdict is spam."""

from hypothesis import given
from hypothesis import strategies as st

from spamfilterd.rules import Decision, verdict_for
from spamfilterd.scores import score_on_grid, score_text, threshold_on_grid
from spamfilterd.tagging import status_headers


def test_grid_rounding():
    assert threshold_on_grid(0.99993) == 1.0
    assert threshold_on_grid(0.5) == 0.5 and threshold_on_grid(0.999) == 0.999
    assert threshold_on_grid(0.0) == 0.0
    assert score_on_grid(0.99983) == 0.999 and score_text(0.99983) == "0.999"
    assert score_on_grid(0.999) == 0.999 and score_on_grid(1.0) == 1.0


def test_the_old_contradiction_cannot_happen():
    # Card threshold 0.99993, score 0.99983: once printed `score=1.000 required=1.000 verdict=unsure`.
    assert verdict_for(0.99983, 0.99993, 0.5) == "unsure"
    decision = Decision(verdict="unsure", score=0.99983, actions=(), rule="default")
    status = dict(status_headers(decision, threshold_on_grid(0.99993), "m"))["X-Spam-Status"]
    assert "score=0.999 required=1.000 verdict=unsure" in status


@given(
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
)
def test_printed_comparison_is_the_verdict(score, threshold):
    required = threshold_on_grid(threshold)
    verdict = verdict_for(score, required, 0.0)
    assert (float(score_text(score)) >= float(f"{required:.3f}")) == (verdict == "spam")
