"""Rule evaluation: thresholds, first match wins, allow/deny lists, the documented default."""

import pytest

from spamfilterd.rules import (
    Envelope,
    address_matches,
    decide,
    decide_per_recipient,
    parse_rules,
    recipient_policy,
)
from spamfilterd.scores import Thresholds

RULES = parse_rules(
    [
        {"name": "postmaster", "match": {"recipient_in": ["postmaster@*"]}, "actions": ["accept"]},
        {
            "name": "partners",
            "match": {"sender_in": ["*@partner.example", "trusted.example"], "verdict": ["spam", "unsure"]},
            "actions": ["tag"],
        },
        {
            "name": "certain",
            "match": {"verdict": "spam", "score_min": 0.99},
            "actions": [{"reject": "No thanks"}],
        },
        {
            "name": "quarantine",
            "match": {"verdict": "spam", "from_domain_not_in": ["*.bank.example"]},
            "actions": ["tag", "subject-prefix", {"redirect": "quarantine@example.com"}],
        },
        {"match": {"verdict": "unsure", "score_max": 0.4}, "actions": ["subject-prefix"]},
    ]
)


def _decide(verdict, score, mail_from="", rcpt=("bob@example.com",), from_domain="spammer.example"):
    return decide(RULES, verdict, score, Envelope(mail_from, tuple(rcpt)), from_domain)


@pytest.mark.parametrize(
    ("score", "verdict"), [(0.0, "ham"), (0.29, "ham"), (0.3, "unsure"), (0.49, "unsure"), (0.5, "spam")]
)
def test_verdict_thresholds_are_inclusive(score, verdict):
    assert Thresholds(spam=0.5, unsure=0.3).verdict(score) == verdict


def test_first_matching_rule_wins():
    # postmaster comes first, so even a certain spam to postmaster is accepted
    assert _decide("spam", 1.0, rcpt=["alice@x.org", "Postmaster@example.com"]).rule == "postmaster"
    assert _decide("spam", 1.0, mail_from="<News@Partner.Example>").rule == "partners"
    assert _decide("spam", 1.0, mail_from="x@trusted.example").rule == "partners"
    assert _decide("spam", 1.0, mail_from="x@sub.trusted.example").rule == "certain"


def test_decision_carries_rule_arguments():
    reject = _decide("spam", 0.995)
    assert (reject.actions, reject.reject_text, reject.flagged) == (("reject",), "No thanks", False)
    quarantine = _decide("spam", 0.9)
    assert quarantine.rule == "quarantine"
    assert quarantine.actions == ("tag", "subject-prefix", "redirect")
    assert (quarantine.redirect_to, quarantine.subject_prefix) == ("quarantine@example.com", "[SPAM] ")
    assert quarantine.flagged


def test_deny_list_and_missing_from_domain():
    assert _decide("spam", 0.9, from_domain="mail.bank.example").rule == "default"
    # no parsable From: header -> "not in" the deny list
    assert _decide("spam", 0.9, from_domain=None).rule == "quarantine"


def test_score_max_is_exclusive_and_unnamed_rules_are_named_by_position():
    assert _decide("unsure", 0.39).rule == "rules[4]"
    assert _decide("unsure", 0.4).rule == "default"


def test_default_tags_spam_and_accepts_the_rest():
    assert decide((), "spam", 0.7, Envelope(), None).actions == ("tag",)
    assert decide((), "unsure", 0.4, Envelope(), None).actions == ("accept",)
    ham = decide((), "ham", 0.1, Envelope(), None)
    assert (ham.rule, ham.flagged, ham.redirect_to) == ("default", False, None)


@pytest.mark.parametrize(
    ("address", "pattern", "hit"),
    [
        ("<Alice@Example.COM>", "*@example.com", True),
        ("alice@example.com", "example.com", True),
        ("alice@mail.example.com", "example.com", False),
        ("alice@mail.example.com", "*.example.com", True),
        ("", "<>", True),
        ("<>", "<>", True),
        ("alice@example.com", "<>", False),
        ("alice@example.com", "bob@*", False),
    ],
)
def test_address_patterns(address, pattern, hit):
    assert address_matches(address, pattern) is hit


def test_rules_decide_per_recipient_and_group_recipients_with_the_same_decision():
    envelope = Envelope(
        "x@spammer.example", ("bob@example.com", "postmaster@example.com", "carol@example.com")
    )
    groups = decide_per_recipient(RULES, "spam", 0.995, envelope, "spammer.example")
    assert [(decision.rule, rcpts) for decision, rcpts in groups] == [
        ("certain", ("bob@example.com", "carol@example.com")),
        ("postmaster", ("postmaster@example.com",)),
    ]
    (only,) = decide_per_recipient(RULES, "spam", 0.995, Envelope(), "spammer.example")  # pipe mode
    assert only == (decide(RULES, "spam", 0.995, Envelope(), "spammer.example"), ())
    assert recipient_policy(RULES, "bob@example.com") == recipient_policy(RULES, "carol@example.org")
    assert recipient_policy(RULES, "bob@example.com") != recipient_policy(RULES, "Postmaster@example.com")
