"""Scores and thresholds on one printed grid, so that what a header says is what was decided.

Headers print P(spam) with three decimals. If a threshold could sit between two printed values, a
message could read `score=1.000 required=1.000` and still not be spam. So thresholds live on the
0.001 grid (rounded up: never less careful than asked), scores are compared after rounding *down*
to it, and `score >= required` as printed holds exactly when the verdict is spam.
"""

import math
from dataclasses import dataclass
from typing import Literal, get_args

DECIMALS = 3
_UNITS = 10**DECIMALS
_FLOAT_SLACK = 1e-9  # 0.999 * 1000 is 998.9999999999999 in binary floating point

Verdict = Literal["ham", "unsure", "spam"]
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)
DEFAULT_THRESHOLD = 0.5  # the model's own argmax point, for cards that choose no threshold
NEVER = 1.01  # a threshold no score reaches: nothing is spam


def threshold_on_grid(threshold: float) -> float:
    """The threshold rounded up to the printed grid."""
    return math.ceil(threshold * _UNITS - _FLOAT_SLACK) / _UNITS


def score_on_grid(score: float) -> float:
    """P(spam) rounded down to the printed grid: the value every verdict is decided on."""
    return math.floor(score * _UNITS + _FLOAT_SLACK) / _UNITS


def score_text(score: float) -> str:
    return f"{score_on_grid(score):.{DECIMALS}f}"


def valid_threshold(value: object) -> float:
    """`value` as a threshold, a probability from 0 to 1.01; ValueError saying what is wrong otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    if not 0.0 <= value <= NEVER:
        raise ValueError(f"expected a probability between 0 and {NEVER}, got {float(value)}")
    return float(value)


@dataclass(frozen=True)
class Thresholds:
    """Where the verdicts change: spam from `spam` up, unsure from `unsure` up to it, ham below.

    Both are kept on the printed grid (rounded up on construction); `unsure == spam` means no
    unsure band. An unsure threshold above the spam one is an error, not silently ignored.
    """

    spam: float = DEFAULT_THRESHOLD
    unsure: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        spam, unsure = valid_threshold(self.spam), valid_threshold(self.unsure)
        object.__setattr__(self, "spam", threshold_on_grid(spam))
        object.__setattr__(self, "unsure", threshold_on_grid(unsure))
        if self.unsure > self.spam:
            raise ValueError(f"the unsure threshold {unsure} is above the spam threshold {spam}")

    def verdict(self, score: float) -> Verdict:
        """The verdict of P(spam) `score` as printed (rounded down), so headers never contradict it."""
        printed = score_on_grid(score)
        if printed >= self.spam:
            return "spam"
        if printed >= self.unsure:
            return "unsure"
        return "ham"
