"""FilterEngine: raw messages in, decisions and tagged message bytes out.

The pipe filter and the SMTP proxy both go through here, so a message gets the same verdict,
the same rule and the same headers whichever way it arrives. The engine keeps no per-call
state, so it is exactly as thread-safe as the classifier's `score`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spamfilterd.config import Config, effective_thresholds
from spamfilterd.message import Header, header_of, message_to_text
from spamfilterd.rules import Decision, Envelope, decide_per_recipient
from spamfilterd.tagging import STATUS, original_recipients_header, rewrite_headers, status_headers

if TYPE_CHECKING:
    from spamfilterd.classifier import SpamClassifier

# The GTUBE test string: lets an admin check an install end to end without a real spam at hand.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE_TEXT = GTUBE.decode("ascii")


@dataclass
class Delivery:
    """One group of recipients with the same decision, and the message as tagged for them."""

    decision: Decision
    recipients: tuple[str, ...]
    message: bytes


@dataclass
class CheckResult:
    decision: Decision  # the first recipient's (pipe mode: the envelope's)
    message: bytes  # the message to deliver: our headers applied, body bytes unchanged
    text_chars: int  # length of the text the classifier read
    notes: list[str] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)  # one per decision, first one first


class FilterEngine:
    def __init__(self, config: Config, classifier: SpamClassifier):
        self.config = config
        self.classifier = classifier
        self.model_id: str = classifier.model_id
        self.thresholds = effective_thresholds(config, classifier.thresholds)

    @classmethod
    def from_config(cls, config: Config) -> FilterEngine:
        """Load the checkpoint named by the config (imports torch, hence not at module level)."""
        from spamfilterd.classifier import SpamClassifier

        model = config.model
        classifier = SpamClassifier.load(
            model.checkpoint,
            device=model.device,
            precision=model.precision,
            threads=model.threads or None,
            batch_size=model.batch_size,
        )
        return cls(config, classifier)

    def check(self, message: bytes | Header, envelope: Envelope | None = None) -> CheckResult:
        return self.check_many([message], [envelope or Envelope()])[0]

    def check_many(
        self, messages: Sequence[bytes | Header], envelopes: Sequence[Envelope] | None = None
    ) -> list[CheckResult]:
        """Check a batch with ONE classifier call; classifier errors propagate (see `unchecked`).

        A message is its raw bytes, or its header block as a door already read it (`read_header`):
        each header block is read once, and the rules and tagging use that reading."""
        envelopes = envelopes if envelopes is not None else [Envelope()] * len(messages)
        if len(envelopes) != len(messages):
            raise ValueError(f"{len(messages)} messages but {len(envelopes)} envelopes")
        max_bytes = self.config.message.max_bytes
        texts = [message_to_text(message, max_bytes) for message in messages]
        # Raw bytes, and the decoded text for a GTUBE inside a base64 or quoted-printable body.
        gtube = [GTUBE in text.header.raw or GTUBE_TEXT in text.text for text in texts]
        to_score = [text.text for text, is_test in zip(texts, gtube, strict=True) if not is_test]
        model_scores = iter(self.classifier.score(to_score) if to_score else [])
        results = []
        for envelope, text, is_test in zip(envelopes, texts, gtube, strict=True):
            if is_test:
                score, verdict = 1.0, "spam"
            else:
                score = float(next(model_scores))
                verdict = self.thresholds.verdict(score)
            groups = decide_per_recipient(
                self.config.rules, verdict, score, envelope, text.header.from_domain, gtube=is_test
            )
            notes = [*text.notes, *(["GTUBE test string found"] if is_test else [])]
            deliveries = [
                Delivery(
                    decision,
                    rcpts,
                    self.tag(text.header, decision, Envelope(envelope.mail_from, rcpts), not text.is_email),
                )
                for decision, rcpts in groups
            ]
            first = deliveries[0]
            results.append(CheckResult(first.decision, first.message, len(text.text), notes, deliveries))
        return results

    def tag(self, header: Header, decision: Decision, envelope: Envelope, bare_text: bool = False) -> bytes:
        """Strip forged X-Spam headers, write ours, apply subject-prefix and the redirect header to
        the message whose header block `header` is (read once per message, whatever the groups)."""
        headers = status_headers(decision, self.thresholds.spam, self.model_id)
        if "redirect" in decision.actions and envelope.rcpt_tos:
            headers.append(original_recipients_header(envelope.rcpt_tos))
        prefix = decision.subject_prefix if "subject-prefix" in decision.actions else None
        return rewrite_headers(header, headers, subject_prefix=prefix, bare_text=bare_text)

    def unchecked(self, message: bytes | Header) -> bytes:
        """The message to pass on when the classifier failed: no forged verdict survives it."""
        header = header_of(message)
        return rewrite_headers(header, [(STATUS, "unchecked")], bare_text=not header.is_email)
