"""Scores and thresholds on one printed grid, so that what a header says is what was decided.

Headers print P(spam) with three decimals. If a threshold could sit between two printed values, a
message could read `score=1.000 required=1.000` and still not be spam. So thresholds live on the
0.001 grid (rounded up: never less careful than asked), scores are compared after rounding *down*
to it, and `score >= required` as printed holds exactly when the verdict is spam.
"""

import math

DECIMALS = 3
_UNITS = 10**DECIMALS
_FLOAT_SLACK = 1e-9  # 0.999 * 1000 is 998.9999999999999 in binary floating point


def threshold_on_grid(threshold: float) -> float:
    """The threshold rounded up to the printed grid."""
    return math.ceil(threshold * _UNITS - _FLOAT_SLACK) / _UNITS


def score_on_grid(score: float) -> float:
    """P(spam) rounded down to the printed grid: the value every verdict is decided on."""
    return math.floor(score * _UNITS + _FLOAT_SLACK) / _UNITS


def score_text(score: float) -> str:
    return f"{score_on_grid(score):.{DECIMALS}f}"
