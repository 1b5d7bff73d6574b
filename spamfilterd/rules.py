"""Verdicts and rules: what happens to a message once the classifier has scored it.

Rules are plain data (built and validated by `spamfilterd.config`); this module only evaluates
them, so the SMTP proxy and the pipe filter reach the same decision for the same message.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from spamfilterd.scores import score_on_grid, threshold_on_grid

VERDICTS = ("ham", "unsure", "spam")
ACTIONS = ("accept", "tag", "subject-prefix", "redirect", "reject", "tempfail")
# Actions that decide the fate of the message alone: they combine with nothing else.
EXCLUSIVE_ACTIONS = ("accept", "reject", "tempfail")

DEFAULT_SUBJECT_PREFIX = "[SPAM] "
DEFAULT_REJECT_TEXT = "Message rejected as spam"
DEFAULT_TEMPFAIL_TEXT = "Message deferred by the spam filter, please try again later"
DEFAULT_RULE = "default"


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope; empty in pipe mode unless `--sender`/`--recipient` are given."""

    mail_from: str = ""
    rcpt_tos: tuple[str, ...] = ()


@dataclass(frozen=True)
class Match:
    """Conditions of one rule; all given conditions must hold, an absent one always holds.

    `*_in` holds when the value matches one of the glob patterns; `*_not_in` is its exact
    negation. Recipients are decided one at a time (`decide_per_recipient`), so a rule for
    postmaster never decides for the other recipients of the same message.
    """

    verdicts: tuple[str, ...] | None = None
    score_min: float | None = None  # score >= score_min
    score_max: float | None = None  # score < score_max
    sender_in: tuple[str, ...] | None = None
    sender_not_in: tuple[str, ...] | None = None
    from_domain_in: tuple[str, ...] | None = None
    from_domain_not_in: tuple[str, ...] | None = None
    recipient_in: tuple[str, ...] | None = None
    recipient_not_in: tuple[str, ...] | None = None

    def matches(self, verdict: str, score: float, envelope: Envelope, from_domain: str | None) -> bool:
        if self.verdicts is not None and verdict not in self.verdicts:
            return False
        if self.score_min is not None and score < self.score_min:
            return False
        if self.score_max is not None and score >= self.score_max:
            return False
        senders = [envelope.mail_from]
        domains = [from_domain] if from_domain else []
        return (
            _list_holds(senders, self.sender_in, self.sender_not_in, address_matches)
            and _list_holds(domains, self.from_domain_in, self.from_domain_not_in, domain_matches)
            and _list_holds(
                list(envelope.rcpt_tos), self.recipient_in, self.recipient_not_in, address_matches
            )
        )


@dataclass(frozen=True)
class Rule:
    """One entry of `rules:`; `name` is the configured name or its position (`rules[2]`)."""

    name: str
    match: Match
    actions: tuple[str, ...]
    subject_prefix: str | None = None
    redirect_to: str | None = None
    reject_text: str | None = None
    tempfail_text: str | None = None


@dataclass(frozen=True)
class Decision:
    """What to do with one message; the SMTP proxy enforces it, the pipe filter reports it.

    The SMTP proxy answers `554 5.7.1 <reject_text>` for `reject` and `451 4.7.1 <tempfail_text>`
    for `tempfail`, and delivers to `redirect_to` instead of the recipients for `redirect`.
    """

    verdict: str
    score: float
    actions: tuple[str, ...]
    rule: str
    redirect_to: str | None = None
    reject_text: str | None = None
    tempfail_text: str | None = None
    subject_prefix: str | None = None
    gtube: bool = False

    @property
    def flagged(self) -> bool:
        """True when the message is marked as spam for mail clients (`X-Spam-Flag: YES`)."""
        return "tag" in self.actions


def verdict_for(score: float, spam_threshold: float, unsure_threshold: float) -> str:
    """The verdict on the printed grid (spamfilterd.scores), so headers never contradict it."""
    printed = score_on_grid(score)
    if printed >= threshold_on_grid(spam_threshold):
        return "spam"
    if printed >= threshold_on_grid(unsure_threshold):
        return "unsure"
    return "ham"


def decide(
    rules: tuple[Rule, ...],
    verdict: str,
    score: float,
    envelope: Envelope,
    from_domain: str | None,
    gtube: bool = False,
) -> Decision:
    """First matching rule wins; without one, spam is tagged and everything else accepted."""
    for rule in rules:
        if rule.match.matches(verdict, score, envelope, from_domain):
            return Decision(
                verdict=verdict,
                score=score,
                actions=rule.actions,
                rule=rule.name,
                redirect_to=rule.redirect_to,
                reject_text=rule.reject_text,
                tempfail_text=rule.tempfail_text,
                subject_prefix=rule.subject_prefix,
                gtube=gtube,
            )
    actions = ("tag",) if verdict == "spam" else ("accept",)
    return Decision(verdict=verdict, score=score, actions=actions, rule=DEFAULT_RULE, gtube=gtube)


def decide_per_recipient(
    rules: tuple[Rule, ...],
    verdict: str,
    score: float,
    envelope: Envelope,
    from_domain: str | None,
    gtube: bool = False,
) -> list[tuple[Decision, tuple[str, ...]]]:
    """Each recipient's own decision, recipients with the same one grouped (in envelope order);
    without recipients (pipe mode), the one decision for the envelope. As amavis does, the SMTP
    proxy delivers each group in a transaction of its own."""
    if not envelope.rcpt_tos:
        return [(decide(rules, verdict, score, envelope, from_domain, gtube), ())]
    groups: dict[Decision, list[str]] = {}
    for rcpt in envelope.rcpt_tos:
        alone = Envelope(envelope.mail_from, (rcpt,))
        groups.setdefault(decide(rules, verdict, score, alone, from_domain, gtube), []).append(rcpt)
    return [(decision, tuple(rcpts)) for decision, rcpts in groups.items()]


def recipient_policy(rules: tuple[Rule, ...], address: str) -> tuple[bool, ...]:
    """Which rules' recipient conditions hold for `address`. Two recipients with the same policy get
    the same decision for every message: all other conditions are the message's own."""
    return tuple(
        _list_holds([address], rule.match.recipient_in, rule.match.recipient_not_in, address_matches)
        for rule in rules
        if rule.match.recipient_in is not None or rule.match.recipient_not_in is not None
    )


def refusing(rules: tuple[Rule, ...]) -> bool:
    """True when some rule refuses mail (`reject`, `tempfail`): recipients of one message may then
    need different answers, which a single SMTP reply to DATA cannot give."""
    return any(action in ("reject", "tempfail") for rule in rules for action in rule.actions)


def normalize_address(address: str) -> str:
    """`<User@Example.COM>` → `user@example.com`; the null sender `<>` becomes `""`."""
    return address.strip().strip("<>").strip().lower()


def address_matches(address: str, pattern: str) -> bool:
    """Glob match of a whole address; a pattern without `@` matches the domain; `<>` the null sender."""
    address = normalize_address(address)
    pattern = pattern.lower()
    if pattern == "<>":
        return address == ""
    if "@" not in pattern:
        return "@" in address and fnmatchcase(address.rpartition("@")[2], pattern)
    return fnmatchcase(address, pattern)


def domain_matches(domain: str, pattern: str) -> bool:
    return fnmatchcase(domain.lower(), pattern.lower())


def _list_holds(values: list[str], allow, deny, matcher) -> bool:
    def any_hit(patterns: tuple[str, ...]) -> bool:
        return any(matcher(value, pattern) for value in values for pattern in patterns)

    if allow is not None and not any_hit(allow):
        return False
    return deny is None or not any_hit(deny)
