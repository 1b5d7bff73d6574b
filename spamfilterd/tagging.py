"""Header surgery on raw message bytes: strip forged X-Spam headers, add ours, prefix the Subject.

We never re-serialise a parsed message (the `email` package re-folds headers and may re-encode
bodies, which breaks DKIM signatures and users' trust); only the header lines we own change, the
body bytes and the line-ending style (CRLF or LF) stay exactly as they arrived.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from spamfilterd.message import Header, HeaderField, header_of
from spamfilterd.rules import Decision
from spamfilterd.scores import score_text

FLAG = "X-Spam-Flag"
STATUS = "X-Spam-Status"
SCORE = "X-Spam-Score"
LEVEL = "X-Spam-Level"
MODEL = "X-Spam-Model"
ORIGINAL_RECIPIENTS = "X-Spam-Original-Recipients"
# Every header we write; copies that arrive with a message are forged or stale and are removed.
OWN_HEADERS = (FLAG, STATUS, SCORE, LEVEL, MODEL, ORIGINAL_RECIPIENTS)

_FOLD_WIDTH = 78


def _prefixed_subject(field: bytes, prefix: str, subject: str) -> bytes:
    """The Subject field with `prefix` in front, unless its decoded text `subject` starts with it."""
    if subject.lower().startswith(prefix.strip().lower()):
        return field
    name, _, rest = field.partition(b":")
    value = rest.lstrip(b" \t")
    if value[:1] in (b"\r", b"\n", b""):  # the text starts on a continuation line
        return name + b": " + prefix.rstrip().encode("ascii") + rest
    sep = b"" if prefix[-1:].isspace() else b" "  # YAML drops a trailing space: "[SPAM]" reads "[SPAM] …"
    return name + b": " + prefix.encode("ascii") + sep + value


def _clean(value: str) -> str:
    """Header values we write come from config, model cards and envelopes: never let them inject lines."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", value).strip()


def _header_line(name: str, value: str, newline: bytes) -> bytes:
    """Status headers stay on one line (cut under 998 bytes) so grep and procmail see them whole;
    the recipient list, which grows with the envelope, is folded at 78 columns (RFC 5322 2.2.3),
    never cut: every original recipient must survive a redirect."""
    if name.lower() != ORIGINAL_RECIPIENTS.lower():
        return f"{name}: {value[:900]}".encode() + newline
    out = f"{name}:"
    width = len(out)
    for word in value.split(" "):
        if width + 1 + len(word) > _FOLD_WIDTH and width > len(name) + 1:
            out += newline.decode() + " " + word  # unfolds to exactly the original value
            width = 1 + len(word)
        else:
            out += " " + word
            width += 1 + len(word)
    return out.encode() + newline  # UTF-8 only for SMTPUTF8 addresses (RFC 6532)


def rewrite_headers(
    message: bytes | Header,
    add: list[tuple[str, str]],
    subject_prefix: str | None = None,
    strip: tuple[str, ...] = OWN_HEADERS,
    bare_text: bool = False,
) -> bytes:
    """Remove `strip` headers (with their continuation lines), prefix the Subject, add `add`.

    `message` is the raw message, or its header block as `read_header` already read it. The new
    headers go first (after an mbox `From ` line), where every parser finds them however malformed
    the rest of the header block is. A message without headers gets a header block and a blank
    line in front of its unchanged text; `bare_text` says the message is known to be headerless (an
    SMS starting "Urgent: call now" is not a header). The fields end where a strict parser ends
    them, or at the byte cap (message.MAX_HEADER_BYTES); a header block that runs into the body
    without a blank line gets one.
    """
    header = header_of(message)
    raw, nl = header.raw, header.newline
    strip_names = {name.lower() for name in strip}
    fields: Sequence[HeaderField] = ()
    if bare_text:
        lead, rest = b"", raw
    else:
        lead = raw[: header.lead]
        lead = lead if lead.endswith(b"\n") or not lead else lead + nl
        fields = header.strict_fields(strip_names)
        rest = raw[fields[-1].end if fields else header.lead :]
    kept = [f for f in fields if not ({f.name} | f.hidden) & strip_names]
    pieces = [raw[f.start : f.end] for f in kept]
    if subject_prefix:
        subject = next((i for i, f in enumerate(kept) if f.name == "subject"), None)
        if subject is not None:
            pieces[subject] = _prefixed_subject(pieces[subject], subject_prefix, header.subject)
        else:
            add = [*add, ("Subject", subject_prefix.rstrip())]
    added = [_header_line(name, _clean(value), nl) for name, value in add]
    if rest and not rest.startswith((b"\n", b"\r\n")):
        rest = nl + rest
    return lead + b"".join(added) + b"".join(pieces) + rest


def status_headers(decision: Decision, required: float, model_id: str) -> list[tuple[str, str]]:
    """The SpamAssassin-shaped headers written on every checked message, ham included."""
    yes = "Yes" if decision.flagged else "No"
    status = (
        f"{yes}, score={score_text(decision.score)} required={required:.3f} verdict={decision.verdict}"
        f" rule={decision.rule} model={_clean(model_id).replace(' ', '_')}"
    )
    if decision.gtube:
        status += " tests=GTUBE"
    return [
        (FLAG, "YES" if decision.flagged else "NO"),
        (STATUS, status),
        (SCORE, score_text(decision.score)),
        (LEVEL, "*" * min(10, max(0, int(decision.score * 10 + 1e-9)))),
        (MODEL, model_id),
    ]


def original_recipients_header(rcpt_tos: tuple[str, ...]) -> tuple[str, str]:
    return ORIGINAL_RECIPIENTS, ", ".join(rcpt_tos)
