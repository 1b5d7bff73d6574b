"""What the spamd door and its thin client share: status codes, the score mapping, our extension.

SpamAssassin's SPAMC/SPAMD protocol (spamd/PROTOCOL in SpamAssassin): a request line
`VERB SPAMC/1.5`, header lines, a blank line, the message; an answer `SPAMD/1.5 0 EX_OK`, header
lines (`Spam: True ; S / R`), a blank line, a body. Clients decide on `S >= R` (Exim) or on the
True/False word (spamc), so both must always agree; `spamd_score` guarantees it. Kept free of
asyncio and torch: `spamfilterd classify` imports it on its fast path.
"""

from __future__ import annotations

import re

from spamfilterd.scores import score_on_grid

# sysexits.h codes used as spamd status codes.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_TIMEOUT = 79
STATUS_NAMES = {
    EX_OK: "EX_OK",
    EX_USAGE: "EX_USAGE",
    EX_DATAERR: "EX_DATAERR",
    EX_UNAVAILABLE: "EX_UNAVAILABLE",
    EX_SOFTWARE: "EX_SOFTWARE",
    EX_TEMPFAIL: "EX_TEMPFAIL",
    EX_PROTOCOL: "EX_PROTOCOL",
    EX_TIMEOUT: "EX_TIMEOUT",
}

PROTOCOL_VERSION = "1.5"
# The required score R we report; P(spam) is mapped onto 0..10 so that S >= R exactly for spam.
REQUIRED_SCORE = 5.0
# Our extension: a request carrying `Spamfilterd-Result: yes` gets the full decision back as
# one JSON header line of that name, so `spamfilterd classify` can print what it prints
# in-process. Other clients never see it.
RESULT_HEADER = "Spamfilterd-Result"
_SYMBOL_UNSAFE = re.compile(r"[^A-Z0-9_]+")


def spamd_score(probability: float, spam_threshold: float, is_spam: bool) -> float:
    """P(spam) → S on 0..10, one decimal, with S >= REQUIRED_SCORE exactly when `is_spam`.

    Below the spam threshold P maps linearly onto 0..5, from the threshold up onto 5..10, so the
    threshold itself lands on R = 5.0. Where the decision differs from the bare P (a GTUBE test
    message, a rule that tags or accepts) S is moved to the nearest value on the right side.
    """
    p = min(1.0, max(0.0, score_on_grid(probability)))  # the value the verdict was decided on
    if p < spam_threshold:
        score = REQUIRED_SCORE * p / spam_threshold
    elif spam_threshold >= 1.0:
        score = 2 * REQUIRED_SCORE
    else:
        score = REQUIRED_SCORE + REQUIRED_SCORE * (p - spam_threshold) / (1.0 - spam_threshold)
    score = round(score, 1)
    if is_spam:
        return max(score, REQUIRED_SCORE)
    return min(score, REQUIRED_SCORE - 0.1)


def symbol(prefix: str, name: str) -> str:
    """A SpamAssassin-style test name: upper case letters, digits and underscores."""
    return prefix + _SYMBOL_UNSAFE.sub("_", name.upper()).strip("_")
