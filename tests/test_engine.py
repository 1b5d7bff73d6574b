"""FilterEngine with a real (tiny, random) checkpoint: one model call per batch, rules, headers."""

import email
from pathlib import Path

import pytest

from spamfilterd.config import Config, ConfigError, ModelConfig, ThresholdsConfig
from spamfilterd.engine import GTUBE, FilterEngine
from spamfilterd.message import message_to_text
from spamfilterd.rules import Envelope, parse_rules
from spamfilterd.scores import Thresholds, score_on_grid, score_text
from tests.conftest import make_tiny_checkpoint
from tests.helpers import count_header_reads

BODY = b"Hi Bob,\r\n\r\nare we still on for lunch?\r\n-- \r\nAlice\r\n"
MAIL = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: Lunch\r\n"
    b"X-Spam-Flag: NO\r\n"
    b"X-Spam-Status: No, score=0.000\r\n required=9\r\n"
    b"\r\n" + BODY
)
SAMPLES = Path(__file__).parent / "data" / "messages"
SMS = b"Urgent: you have won a 1 week FREE membership in our prize jackpot! Txt CLAIM to 81010"


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint):
    from spamfilterd.classifier import SpamClassifier

    return SpamClassifier.load(tiny_checkpoint, device="cpu", threads=1)


def _engine(classifier, tiny_checkpoint: Path, rules=(), **thresholds) -> FilterEngine:
    config = Config(
        model=ModelConfig(checkpoint=tiny_checkpoint),
        thresholds=ThresholdsConfig(**thresholds),
        rules=parse_rules(list(rules)),
    )
    return FilterEngine(config, classifier)


def _head(message: bytes) -> email.message.Message:
    return email.message_from_bytes(message)


def test_check_many_scores_a_batch_in_one_model_call(classifier, tiny_checkpoint, monkeypatch):
    engine = _engine(classifier, tiny_checkpoint)
    calls = []
    real_score = classifier.score
    monkeypatch.setattr(classifier, "score", lambda texts: calls.append(len(texts)) or real_score(texts))
    results = engine.check_many([MAIL, SMS, b"Subject: " + GTUBE + b"\n\nx\n"], [Envelope()] * 3)
    assert calls == [2]  # the GTUBE message never reaches the model
    # padding in a batch does not change a message's score (read at its last real token)
    assert results[1].decision.score == pytest.approx(engine.check(SMS).decision.score, abs=1e-5)
    assert results[2].decision.verdict == "spam" and results[2].decision.score == 1.0
    assert "GTUBE test string found" in results[2].notes
    assert all(r.text_chars > 0 for r in results)


def test_thresholds_default_to_the_model_card(classifier, tiny_checkpoint):
    engine = _engine(classifier, tiny_checkpoint)
    assert engine.thresholds == Thresholds(spam=0.5, unsure=0.3)
    result = engine.check(MAIL)
    score = result.decision.score
    assert result.decision.verdict == ("spam" if score >= 0.5 else "unsure" if score >= 0.3 else "ham")
    with pytest.raises(ConfigError, match=r"thresholds\.unsure"):
        _engine(classifier, tiny_checkpoint, unsure=0.9)


def test_ham_gets_status_headers_forged_ones_removed_body_unchanged(classifier, tiny_checkpoint):
    engine = _engine(classifier, tiny_checkpoint, spam=1.01, unsure=1.01)
    result = engine.check(MAIL)
    head, _, body = result.message.partition(b"\r\n\r\n")
    assert body == BODY
    assert b"required=9" not in head and head.count(b"X-Spam-Flag") == 1
    headers = _head(result.message)
    score = score_text(result.decision.score)  # the printed grid: floored, never rounded up
    assert headers["X-Spam-Flag"] == "NO"
    assert headers["X-Spam-Status"] == (
        f"No, score={score} required=1.010 verdict=ham rule=default model={engine.model_id}"
    )
    assert headers["X-Spam-Score"] == score
    assert headers["X-Spam-Model"] == engine.model_id == classifier.model_id
    assert headers["Subject"] == "Lunch"


def test_rules_apply_in_order_with_subject_prefix_and_redirect(classifier, tiny_checkpoint):
    rules = [
        {"name": "vip", "match": {"sender_in": ["*@vip.example"]}, "actions": ["accept"]},
        {
            "name": "refuse",
            "match": {"from_domain_in": ["spammer.example"]},
            "actions": [{"reject": "Go away"}],
        },
        {
            "name": "quarantine",
            "match": {"verdict": "spam"},
            "actions": ["tag", "subject-prefix", {"redirect": "quarantine@example.org"}],
        },
    ]
    engine = _engine(classifier, tiny_checkpoint, rules, spam=0.0)
    envelope = Envelope("alice@example.com", ("bob@example.org", "carol@example.org"))
    vip, quarantined = engine.check_many([MAIL, MAIL], [Envelope("a@vip.example"), envelope])
    assert (vip.decision.rule, vip.decision.actions) == ("vip", ("accept",))
    assert _head(vip.message)["X-Spam-Flag"] == "NO"
    assert "X-Spam-Original-Recipients" not in _head(vip.message)
    decision = quarantined.decision
    assert (decision.verdict, decision.rule, decision.redirect_to) == (
        "spam",
        "quarantine",
        "quarantine@example.org",
    )
    headers = _head(quarantined.message)
    assert headers["Subject"] == "[SPAM] Lunch"
    assert headers["X-Spam-Flag"] == "YES"
    assert headers["X-Spam-Status"].startswith("Yes, score=")
    assert headers["X-Spam-Original-Recipients"] == "bob@example.org, carol@example.org"
    assert quarantined.message.endswith(b"\r\n\r\n" + BODY)
    refused = engine.check(MAIL.replace(b"alice@example.com>", b"x@spammer.example>"))
    assert (refused.decision.actions, refused.decision.reject_text) == (("reject",), "Go away")


def test_the_pipe_path_reads_each_header_block_once(classifier, tiny_checkpoint, monkeypatch):
    """`classify` hands the engine raw bytes: it reads each header block once, for the text, the
    From-domain rule and the tagging of every recipient group."""
    rules = [
        {"match": {"recipient_in": ["postmaster@*"]}, "actions": ["accept"]},
        {"match": {"from_domain_in": ["example.com"]}, "actions": ["tag", "subject-prefix"]},
    ]
    engine = _engine(classifier, tiny_checkpoint, rules, spam=0.0)
    reads = count_header_reads(monkeypatch)
    envelope = Envelope("alice@example.com", ("bob@example.org", "postmaster@example.org"))
    mail, sms = engine.check_many([MAIL, SMS], [envelope, envelope])
    assert (reads.count(MAIL), reads.count(SMS), len(reads)) == (1, 1, 2)
    assert [len(mail.deliveries), len(sms.deliveries)] == [2, 2]
    assert _head(mail.deliveries[0].message)["Subject"] == "[SPAM] Lunch"
    assert _head(mail.deliveries[1].message)["Subject"] == "Lunch"


def test_gtube_is_spam_even_when_thresholds_say_ham(classifier, tiny_checkpoint):
    engine = _engine(classifier, tiny_checkpoint, spam=1.01, unsure=1.01)
    result = engine.check(b"Subject: test\n\n" + GTUBE + b"\n")
    assert (result.decision.verdict, result.decision.score, result.decision.actions) == (
        "spam",
        1.0,
        ("tag",),
    )
    assert _head(result.message)["X-Spam-Status"].endswith("tests=GTUBE")


def test_gtube_inside_a_base64_body_is_caught(classifier, tiny_checkpoint):
    import base64

    engine = _engine(classifier, tiny_checkpoint, spam=1.01, unsure=1.01)
    raw = (
        b"Subject: test\nMIME-Version: 1.0\nContent-Type: text/plain\n"
        b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(b"hello " + GTUBE) + b"\n"
    )
    assert GTUBE not in raw
    result = engine.check(raw)
    assert (result.decision.verdict, result.decision.score) == ("spam", 1.0)


def test_bare_sms_gets_a_header_block_and_keeps_its_text(classifier, tiny_checkpoint):
    result = _engine(classifier, tiny_checkpoint, spam=0.0).check(SMS)
    head, _, body = result.message.partition(b"\n\n")
    assert body == SMS
    assert b"X-Spam-Flag: YES" in head


def test_unchecked_strips_forgeries_and_says_so(classifier, tiny_checkpoint):
    engine = _engine(classifier, tiny_checkpoint)
    out = engine.unchecked(MAIL)
    headers = _head(out)
    assert headers.get_all("X-Spam-Status") == ["unchecked"]
    assert "X-Spam-Flag" not in headers
    assert out.endswith(b"\r\n\r\n" + BODY)
    assert engine.unchecked(SMS) == b"X-Spam-Status: unchecked\n\n" + SMS


@pytest.mark.parametrize(
    "sample", [*sorted(SAMPLES.glob("*.eml")), SAMPLES / "sms.txt"], ids=lambda p: p.name
)
def test_sample_messages_keep_headers_and_body_bytes(classifier, tiny_checkpoint, sample):
    rules = [{"match": {"verdict": "spam"}, "actions": ["tag", "subject-prefix"]}]
    raw = sample.read_bytes()
    result = _engine(classifier, tiny_checkpoint, rules, spam=0.0).check(raw)
    assert result.decision.verdict == "spam" and result.text_chars > 0
    out = result.message
    if sample.suffix == ".txt":  # a bare SMS: a header block in front, the text unchanged
        assert out.endswith(b"\n\n" + raw) and out.startswith(b"X-Spam-Flag: YES\n")
        return
    head, body = raw.split(b"\n\n", 1)
    new_head, new_body = out.split(b"\n\n", 1)
    assert new_body == body
    kept = [line for line in head.split(b"\n") if not line.startswith(b"X-Spam-")]
    assert [line for line in new_head.split(b"\n") if not line.startswith(b"X-Spam-")] == [
        b"Subject: [SPAM] " + line[len(b"Subject: ") :] if line.startswith(b"Subject: ") else line
        for line in kept
    ]
    assert new_head.startswith(b"X-Spam-Flag: YES\nX-Spam-Status: Yes, score=")
    assert new_head.count(b"X-Spam-") == 5


def test_a_score_in_the_unsure_band_is_unsure_for_classify_and_for_the_daemon(tmp_path):
    """`SpamClassifier.classify` and the engine decide by the same rule, unsure band included."""
    from spamfilterd.classifier import SpamClassifier

    text = message_to_text(MAIL, 1_048_576).text
    probe = SpamClassifier.load(make_tiny_checkpoint(tmp_path / "probe"), device="cpu", threads=1)
    printed = score_on_grid(probe.score([text])[0])
    # The same weights (same seed), with the band's edges on either side of that score on the grid.
    band = {"spam": printed + 0.001, "unsure": printed}
    classifier = SpamClassifier.load(make_tiny_checkpoint(tmp_path / "band", band), device="cpu", threads=1)
    verdict, score = classifier.classify(text)
    assert verdict == "unsure" and score_on_grid(score) == printed
    decision = (
        FilterEngine(Config(model=ModelConfig(checkpoint=tmp_path / "band")), classifier).check(MAIL).decision
    )
    assert (decision.verdict, score_on_grid(decision.score)) == ("unsure", printed)
    above = Thresholds(spam=printed, unsure=printed - 0.001)
    assert above.verdict(score) == "spam"
