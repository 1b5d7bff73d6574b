"""Header surgery on raw message bytes: strip forged X-Spam headers, add ours, prefix the Subject.

We never re-serialise a parsed message (the `email` package re-folds headers and may re-encode
bodies, which breaks DKIM signatures and users' trust); only the header lines we own change, the
body bytes and the line-ending style (CRLF or LF) stay exactly as they arrived.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import decode_header, make_header

from spamfilterd.message import is_mbox_from_line
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

# A header line as a strict parser (Python's email among them) reads it: name, then the colon.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]*):")
# RFC 5322's obsolete blank before the colon: accepted only for our own names, to remove them.
_OBS_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]+:")
_BARE_CR = re.compile(rb"\r(?!\n)")
# The continuation lines of a folded field (RFC 5322 2.2.3): each starts with a space or a tab.
_CONTINUATIONS = re.compile(rb"(?:[ \t][^\n]*+(?:\n|\Z))*+")
# Header bytes read at most, far above real mail (Postfix keeps 100 KiB of any one header): it
# bounds the work per message; what follows is left in place, as the start of the body.
MAX_HEADER_BYTES = 262_144
# Enough of a Subject to see whether it already starts with the prefix (at most 50 characters).
_SUBJECT_CHECK_CHARS = 1_000
_FOLD_WIDTH = 78


@dataclass
class _Split:
    """A message cut at the header/body boundary; `lead` is an mbox `From ` line if any."""

    lead: bytes
    fields: list[bytes]  # each a whole field: first line plus continuation lines, with line endings
    rest: bytes  # the blank separator line and the body, or the body alone if the separator is missing
    newline: bytes


def _names(field: bytes) -> set[str]:
    """Header names a parser may find in this field: its own, and any smuggled behind a bare CR,
    which some parsers (Python's email among them) read as a line break."""
    names = set()
    for piece in _BARE_CR.split(field):
        match = _FIELD.match(piece) or _OBS_FIELD.match(piece)
        if match:
            names.add(match.group(1).decode("ascii").lower())
    return names


def _split(raw: bytes, bare_text: bool, strip: set[str]) -> _Split:
    """Linear in the input: each field is one slice, continuation lines are skipped in one regex
    step, and at most MAX_HEADER_BYTES of header lines are read (the rest counts as body)."""
    first_end = raw.find(b"\n")
    newline = b"\r\n" if first_end > 0 and raw[first_end - 1 : first_end] == b"\r" else b"\n"
    if bare_text:
        return _Split(b"", [], raw, newline)
    lead = b""
    if is_mbox_from_line(raw[: first_end + 1] if first_end >= 0 else raw):
        lead = raw[: first_end + 1] if first_end >= 0 else raw + newline
        lead = b"" if _BARE_CR.search(lead) else lead  # else it would hide a header behind the CR
    pos = len(lead)
    limit = len(raw)
    if limit - pos > MAX_HEADER_BYTES:  # stop at the last line end inside the cap
        limit = raw.rfind(b"\n", pos, pos + MAX_HEADER_BYTES) + 1 or pos
    fields: list[bytes] = []
    while pos < limit:
        line_end = raw.find(b"\n", pos, limit)
        line_end = limit if line_end < 0 else line_end + 1
        obsolete = _OBS_FIELD.match(raw, pos, line_end)
        if not (
            _FIELD.match(raw, pos, line_end)
            or (obsolete and obsolete.group(1).decode("ascii").lower() in strip)
        ):
            break
        end = _CONTINUATIONS.match(raw, line_end, limit).end()  # type: ignore[union-attr]
        fields.append(raw[pos:end])
        pos = end
    return _Split(lead, fields, raw[pos:], newline)


def _name(field: bytes) -> str:
    match = _FIELD.match(field)
    return match.group(1).decode("ascii").lower() if match else ""


def _unfold(field: bytes) -> str:
    value = field.split(b":", 1)[1]
    return re.sub(rb"\r?\n(?=[ \t])", b"", value).strip().decode("utf-8", "surrogateescape")


def decoded_subject(raw_value: str) -> str:
    """The Subject as a reader sees it (RFC 2047 decoded); the raw text if it cannot be decoded."""
    try:
        return str(make_header(decode_header(raw_value)))
    except (HeaderParseError, ValueError, LookupError, UnicodeError):
        return raw_value


def _prefixed_subject(field: bytes, prefix: str) -> bytes:
    name, _, rest = field.partition(b":")
    start = decoded_subject(_unfold(field)[:_SUBJECT_CHECK_CHARS])
    if start.lower().startswith(prefix.strip().lower()):
        return field
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
    raw: bytes,
    add: list[tuple[str, str]],
    subject_prefix: str | None = None,
    strip: tuple[str, ...] = OWN_HEADERS,
    bare_text: bool = False,
) -> bytes:
    """Remove `strip` headers (with their continuation lines), prefix the Subject, add `add`.

    The new headers go first (after an mbox `From ` line), where every parser finds them however
    malformed the rest of the header block is. A message without headers gets a header block and
    a blank line in front of its unchanged text; `bare_text` says the message is known to be
    headerless (an SMS starting "Urgent: call now" is not a header). A header block that runs
    into the body without a blank line gets one.
    """
    strip_names = {name.lower() for name in strip}
    parts = _split(raw, bare_text, strip_names)
    nl = parts.newline
    kept = [field for field in parts.fields if not _names(field) & strip_names]
    if subject_prefix:
        subjects = [i for i, field in enumerate(kept) if _name(field) == "subject"]
        if subjects:
            kept[subjects[0]] = _prefixed_subject(kept[subjects[0]], subject_prefix)
        else:
            add = [*add, ("Subject", subject_prefix.rstrip())]
    added = [_header_line(name, _clean(value), nl) for name, value in add]
    rest = parts.rest
    if rest and not rest.startswith((b"\n", b"\r\n")):
        rest = nl + rest
    return parts.lead + b"".join(added) + b"".join(kept) + rest


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
