"""Rules: what happens to a message once the classifier has scored it.

The `rules:` list of the config is read and checked here (`parse_rules`, the grammar beside the
data it builds) and evaluated here, so the SMTP proxy and the pipe filter reach the same decision
for the same message.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from typing import Any

from spamfilterd.schema import ConfigError, kind, mapping, number, optional, parse, setting, string_list
from spamfilterd.scores import VERDICTS

ACTIONS = ("accept", "tag", "subject-prefix", "redirect", "reject", "tempfail")
# Actions that decide the fate of the message alone: they combine with nothing else.
EXCLUSIVE_ACTIONS = ("accept", "reject", "tempfail")

DEFAULT_SUBJECT_PREFIX = "[SPAM] "
DEFAULT_REJECT_TEXT = "Message rejected as spam"
DEFAULT_TEMPFAIL_TEXT = "Message deferred by the spam filter, please try again later"
DEFAULT_RULE = "default"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_ADDRESS = re.compile(r"[^@\s<>,\"]+@[^@\s<>,\"]+")


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope; empty in pipe mode unless `--sender`/`--recipient` are given."""

    mail_from: str = ""
    rcpt_tos: tuple[str, ...] = ()


def _verdicts(value: Any, key: str) -> tuple[str, ...]:
    verdicts = string_list(lower=True)(value, key)
    for verdict in verdicts:
        if verdict not in VERDICTS:
            raise ConfigError(f"{key}: unknown verdict {verdict!r} (expected one of: {', '.join(VERDICTS)})")
    return verdicts


_PATTERNS = string_list(lower=True)  # glob patterns of addresses or domains


@dataclass(frozen=True)
class Match:
    """Conditions of one rule; all given conditions must hold, an absent one always holds.

    `*_in` holds when the value matches one of the glob patterns; `*_not_in` is its exact
    negation. Recipients are decided one at a time (`decide_per_recipient`), so a rule for
    postmaster never decides for the other recipients of the same message.
    """

    verdict: tuple[str, ...] | None = setting(None, optional(_verdicts))
    score_min: float | None = setting(None, optional(number(positive=False)))  # score >= score_min
    score_max: float | None = setting(None, optional(number(positive=False)))  # score < score_max
    sender_in: tuple[str, ...] | None = setting(None, _PATTERNS)
    sender_not_in: tuple[str, ...] | None = setting(None, _PATTERNS)
    from_domain_in: tuple[str, ...] | None = setting(None, _PATTERNS)
    from_domain_not_in: tuple[str, ...] | None = setting(None, _PATTERNS)
    recipient_in: tuple[str, ...] | None = setting(None, _PATTERNS)
    recipient_not_in: tuple[str, ...] | None = setting(None, _PATTERNS)

    def validate(self, path: str) -> None:
        if self.score_min is not None and self.score_max is not None and self.score_min >= self.score_max:
            raise ConfigError(
                f"{path}: score_min ({self.score_min}) must be below score_max ({self.score_max})"
            )

    def matches(self, verdict: str, score: float, envelope: Envelope, from_domain: str | None) -> bool:
        if self.verdict is not None and verdict not in self.verdict:
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


def parse_rules(data: Any, key: str = "rules") -> tuple[Rule, ...]:
    """The `rules:` list, validated; rules without a name are named by position (`rules[2]`)."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(f"{key}: expected a list of rules, got {kind(data)}")
    rules = tuple(_rule(item, f"{key}[{i}]") for i, item in enumerate(data))
    names = [rule.name for rule in rules]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{key}[{i}].name: duplicate rule name {name!r}")
    return rules


_ACTION_DEFAULTS = {
    "subject-prefix": DEFAULT_SUBJECT_PREFIX,
    "reject": DEFAULT_REJECT_TEXT,
    "tempfail": DEFAULT_TEMPFAIL_TEXT,
}
_ACTION_FIELDS = {
    "subject-prefix": "subject_prefix",
    "redirect": "redirect_to",
    "reject": "reject_text",
    "tempfail": "tempfail_text",
}


def _rule(data: Any, path: str) -> Rule:
    given = mapping(data, path, ["name", "match", "actions"])
    name = given.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
        raise ConfigError(f"{path}.name: expected letters, digits, '_', '.', '-' only; got {name!r}")
    raw_actions = given.get("actions")
    if raw_actions is None:
        raise ConfigError(f"{path}.actions: missing (expected a list, e.g. [tag, subject-prefix])")
    if not isinstance(raw_actions, list):
        raw_actions = [raw_actions]
    if not raw_actions:
        raise ConfigError(f"{path}.actions: expected at least one action")
    params: dict[str, Any] = {}
    for i, item in enumerate(raw_actions):
        action, arg = _action(item, f"{path}.actions[{i}]")
        if action in params:
            raise ConfigError(f"{path}.actions[{i}]: action {action!r} given twice")
        params[action] = arg
    for action in EXCLUSIVE_ACTIONS:
        if action in params and len(params) > 1:
            others = ", ".join(a for a in params if a != action)
            raise ConfigError(f"{path}.actions: {action!r} cannot be combined with {others}")
    return Rule(
        name=name or path,
        match=parse(Match, given.get("match"), f"{path}.match"),
        actions=tuple(params),
        **{
            _ACTION_FIELDS[action]: arg if arg is not None else _ACTION_DEFAULTS.get(action)
            for action, arg in params.items()
            if action in _ACTION_FIELDS
        },
    )


def _action(item: Any, path: str) -> tuple[str, str | None]:
    """An action is a name (`tag`) or a one-key mapping with its argument (`redirect: addr`)."""
    arg = None
    if isinstance(item, dict) and len(item) == 1:
        item, arg = next(iter(item.items()))
    if not isinstance(item, str):
        raise ConfigError(f"{path}: expected an action name or a one-key mapping, got {kind(item)}")
    if item not in ACTIONS:
        raise ConfigError(f"{path}: unknown action {item!r} (expected one of: {', '.join(ACTIONS)})")
    if arg is not None and not isinstance(arg, str):
        raise ConfigError(f"{path}: the argument of {item} must be a string, got {kind(arg)}")
    if item in ("accept", "tag") and arg is not None:
        raise ConfigError(f"{path}: {item} takes no argument")
    if item == "redirect" and (arg is None or not _ADDRESS.fullmatch(arg)):
        raise ConfigError(
            f"{path}: redirect needs one address, e.g. {{redirect: quarantine@example.com}}; got {arg!r}"
        )
    if item == "subject-prefix" and arg is not None and not re.fullmatch(r"[ -~]{0,49}[!-~][ -~]{0,49}", arg):
        raise ConfigError(f"{path}: the subject prefix must be 1-50 printable ASCII characters, got {arg!r}")
    if item in ("reject", "tempfail") and arg is not None and not re.fullmatch(r"[ -~]{1,200}", arg):
        raise ConfigError(f"{path}: the {item} text must be 1-200 printable ASCII characters, got {arg!r}")
    return item, arg


def rule_to_dict(rule: Rule, index: int) -> dict[str, Any]:
    """`rule` in the YAML form `parse_rules` reads; a rule named by its position stays unnamed."""
    out: dict[str, Any] = {} if rule.name == f"rules[{index}]" else {"name": rule.name}
    out["match"] = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in asdict(rule.match).items()
        if value is not None
    }
    out["actions"] = [
        {action: getattr(rule, _ACTION_FIELDS[action])} if action in _ACTION_FIELDS else action
        for action in rule.actions
    ]
    return out
