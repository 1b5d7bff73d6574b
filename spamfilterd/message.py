"""Raw message bytes -> the text the classifier reads.

Mail arrives from strangers, so every step here is bounded and defensive: the input is cut at
`max_bytes`, MIME recursion and part counts are capped, the text is capped, and a broken part is
skipped with a note instead of failing the whole message. `message_to_text` never raises.
"""

from __future__ import annotations

import binascii
import codecs
import email.utils
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from email import errors
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from email.policy import compat32
from html.parser import HTMLParser
from typing import NamedTuple

DEFAULT_MAX_BYTES = 1_048_576
MAX_DEPTH = 20
MAX_PARTS = 500
MAX_TEXT_CHARS = 100_000
MAX_SUBJECT_CHARS = 1_000

# Header names that make a leading "Name: value" block an email rather than a chat line like
# "Hi: how are you".
_KNOWN_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "subject",
        "date",
        "received",
        "message-id",
        "mime-version",
        "return-path",
        "content-type",
        "content-transfer-encoding",
        "delivered-to",
        "reply-to",
        "sender",
        "x-mailer",
        "dkim-signature",
        "authentication-results",
    }
)
# Header bytes read at most, far above real mail (Postfix keeps 100 KiB of any one header): it
# bounds the work per message; what follows is left in place, as the start of the body.
MAX_HEADER_BYTES = 262_144
# A field line: its name, then the colon. RFC 5322's obsolete blank before the colon is read too,
# and marked, because strict parsers (Python's email among them) end the header block there.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]*)([ \t]*):")
# The continuation lines of a folded field (RFC 5322 2.2.3): each starts with a space or a tab.
_CONTINUATIONS = re.compile(rb"(?:[ \t][^\n]*+(?:\n|\Z))*+")
# A CR without LF: a line break to some parsers (Python's email among them), so it can hide a field.
_BARE_CR = re.compile(rb"\r(?!\n)")
# Where such a parser starts a new line inside a value: a bare CR not followed by folding blanks.
_CR_BREAK = re.compile(rb"\r(?![\n \t])")
# A blank line, or the end of the message after a line ending (a header block may end there).
_BLANK_LINE = re.compile(rb"\r*(?:\n|\Z)")
# A From: value longer than this is not a real address; it bounds the address parser's work.
_ADDRESS_BYTES = 65_536
# An mbox `From_` line: "From", the envelope sender, then a date, as mail spools, mutt,
# Thunderbird ("From - ...") and git format-patch write it: asctime() (the time zone may sit
# before the year) or, from some exporters, an RFC 5322 date.
_DAY = rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_MONTH = rb"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = rb"\d{1,2}:\d{2}(?::\d{2})?"
_MBOX_FROM = re.compile(
    rb"From \S+ +(?:"
    + (_DAY + rb" +" + _MONTH + rb" +\d{1,2} +" + _TIME + rb"(?: +[A-Z]{1,5}| +[+-]\d{4})? +\d{4}")
    + rb"|"
    + (_DAY + rb", +\d{1,2} +" + _MONTH + rb" +\d{4} +" + _TIME)
    + rb")\b[^\r\n]*\r?\n?"
)


class HeaderField(NamedTuple):
    """One field of the header block: its name and where it lies in the raw bytes, folding included,
    so that tagging can cut it out or rewrite it without touching a byte around it."""

    name: str  # lowercased; "" for a line such as ": x", which strict parsers read as a field
    start: int  # the first byte of the name
    colon: int  # the colon after the name: the value runs from colon + 1 to `end`
    end: int  # just past the line ending of the last continuation line
    obsolete: bool  # a blank before the colon (RFC 5322 obs-syntax): strict parsers stop before it
    hidden: frozenset[str]  # names behind a bare CR inside the field, where some parsers see a new line


@dataclass(frozen=True)
class Header:
    """A message's leading header block, read once by `read_header`: the fields as byte spans for
    tagging, and what the classifier, the rules and the logs read from them, decoded."""

    raw: bytes  # the whole message, as it arrived
    lead: int  # length of an mbox `From_` line before the fields (0 without one)
    fields: tuple[HeaderField, ...]  # up to the first line that is neither a field nor folding
    newline: bytes  # the message's line ending (CRLF or LF), by its first line
    is_email: bool  # a real header block rather than a chat line such as "Hi: how are you"
    subject: str  # the first Subject a strict parser reads, decoded; "" without one
    from_domain: str | None  # lowercased domain of the From: address
    message_id: str  # the first Message-ID, unfolded, printable only; "-" without one

    def strict_fields(self, also: Collection[str] = ()) -> Sequence[HeaderField]:
        """The fields a strict parser reads: up to the first with a blank before its colon, unless
        its name is in `also` (tagging removes our own names even in that obsolete form)."""
        return _strict_fields(self.fields, also)


@dataclass
class MessageText:
    """What the classifier reads, plus what was left out and why (for logs and `--format json`),
    and the message's header block as read once (for the rules, the logs and tagging)."""

    text: str
    header: Header
    notes: list[str] = field(default_factory=list)

    @property
    def subject(self) -> str:
        """The Subject the text starts with: none for a bare text ("Subject: x" as an SMS)."""
        return self.header.subject if self.header.is_email else ""

    @property
    def is_email(self) -> bool:
        return self.header.is_email


def message_to_text(message: bytes | Header, max_bytes: int = DEFAULT_MAX_BYTES) -> MessageText:
    """Turn an email or a bare SMS into classifier text; never raises, work bounded by `max_bytes`.

    `message` is the raw message, or its header block as `read_header` already read it. The header
    block is read from the whole message (it is bounded by MAX_HEADER_BYTES on its own), since
    tagging rewrites the whole message; only the text is cut at `max_bytes`."""
    header = header_of(message)
    raw = header.raw
    notes: list[str] = []
    max_bytes = max(0, max_bytes)
    if len(raw) > max_bytes:
        raw = raw[:max_bytes]
        notes.append(f"truncated at {max_bytes} bytes")
    if not header.is_email:
        return MessageText(_finish(_decode_bytes(raw, None), notes), header, _dedupe(notes))
    try:
        body = _Extractor(notes).run(raw)
        text = f"{header.subject}\n\n{body}" if header.subject else body
    except Exception as exc:  # last line of defence: a parser bug must not lose the message
        notes.append(f"could not parse as email ({type(exc).__name__}); read as plain text")
        text = _decode_bytes(raw, None)
    return MessageText(_finish(text, notes), header, _dedupe(notes))


def is_mbox_from_line(line: bytes) -> bool:
    """True for a real mbox `From_` line (sender and date): a text that merely starts with
    "From " ("From tomorrow onwards ...") is a message, not an mbox."""
    return _MBOX_FROM.fullmatch(line[:1000]) is not None


def header_of(message: bytes | Header) -> Header:
    """The header block of `message`: as a door already read it, else read now."""
    return message if isinstance(message, Header) else read_header(message)


def read_header(raw: bytes) -> Header:
    """Read the leading header block once; linear in the input and never more than
    MAX_HEADER_BYTES of it (what lies beyond counts as body). Never raises.

    Fields run up to the first line that is neither a field nor a continuation line: a blank line,
    the body, or junk. An email needs a well-known header name among the fields before any nameless
    one, and either two such fields or a blank line after one, so that a text such as
    "Date: tomorrow?" or "Hi: how are you" stays a plain message.
    """
    raw = bytes(raw)
    first_end = raw.find(b"\n")
    newline = b"\r\n" if first_end > 0 and raw[first_end - 1 : first_end] == b"\r" else b"\n"
    first_line = raw[: first_end + 1] if first_end >= 0 else raw
    # A bare CR in a `From_` line would hide a header behind it: then it is no mbox line.
    lead = len(first_line) if is_mbox_from_line(first_line) and not _BARE_CR.search(first_line) else 0
    pos = lead
    limit = len(raw)
    if limit - pos > MAX_HEADER_BYTES:  # stop at the last line end inside the cap
        limit = raw.rfind(b"\n", pos, pos + MAX_HEADER_BYTES) + 1 or pos
    fields: list[HeaderField] = []
    while pos < limit:
        match = _FIELD.match(raw, pos, limit)
        if match is None or (match.group(2) and not match.group(1)):
            break
        line_end = raw.find(b"\n", match.end(), limit)
        line_end = limit if line_end < 0 else line_end + 1
        continued = _CONTINUATIONS.match(raw, line_end, limit)
        end = continued.end() if continued else line_end
        name = match.group(1).decode("ascii").lower()
        hidden = _hidden_names(raw[pos:end]) if _BARE_CR.search(raw, pos, end) else frozenset()
        fields.append(HeaderField(name, pos, match.end() - 1, end, bool(match.group(2)), hidden))
        pos = end
    email_fields = _email_fields(fields)
    at_line_start = raw[pos - 1 : pos] == b"\n"  # else the last field ran to the end without one
    blank_after = (
        len(email_fields) == len(fields) and at_line_start and _BLANK_LINE.match(raw, pos) is not None
    )
    is_email = any(f.name in _KNOWN_HEADERS for f in email_fields) and (len(email_fields) >= 2 or blank_after)
    return Header(
        raw,
        lead,
        tuple(fields),
        newline,
        is_email,
        _subject(raw, _strict_fields(fields)),
        _from_domain(raw, email_fields) if is_email else None,
        _message_id(raw, email_fields),
    )


def _email_fields(fields: Sequence[HeaderField]) -> Sequence[HeaderField]:
    """The fields we read an email by: a nameless one (": x") ends them."""
    return next((fields[:i] for i, item in enumerate(fields) if not item.name), fields)


def _strict_fields(fields: Sequence[HeaderField], also: Collection[str] = ()) -> Sequence[HeaderField]:
    return next((fields[:i] for i, f in enumerate(fields) if f.obsolete and f.name not in also), fields)


def _hidden_names(text: bytes) -> frozenset[str]:
    """Header names a parser that breaks lines at a bare CR finds after one inside a field."""
    names = set()
    for piece in _BARE_CR.split(text)[1:]:
        match = _FIELD.match(piece)
        if match and match.group(1):
            names.add(match.group(1).decode("ascii").lower())
    return frozenset(names)


def _first(raw: bytes, fields: Sequence[HeaderField], name: str) -> bytes | None:
    """The raw value of the first field `name`: folding kept, surrounding blanks dropped."""
    return next((raw[f.colon + 1 : f.end].strip() for f in fields if f.name == name), None)


def _subject(raw: bytes, fields: Sequence[HeaderField]) -> str:
    """The Subject a strict parser reads (the one tagging prefixes); like such a parser, it ends at
    a bare CR that starts a new line."""
    value = _first(raw, fields, "subject")
    if value is None:
        return ""
    return _decode_subject(value[: m.start()] if (m := _CR_BREAK.search(value)) else value)


def _decode_subject(value: bytes) -> str:
    """A readable Subject, robust to raw 8-bit bytes and bad encoded-words."""
    return _collapse(_decode_words(_unfold(_decode_bytes(value, None))))[:MAX_SUBJECT_CHARS]


def _from_domain(raw: bytes, fields: Sequence[HeaderField]) -> str | None:
    value = _first(raw, fields, "from")
    if value is None:
        return None
    try:
        text = _decode_words(_unfold(_decode_bytes(value[:_ADDRESS_BYTES], None)))
        for _name, addr in email.utils.getaddresses([text]):
            domain = addr.rpartition("@")[2].strip().strip(".").lower()
            if "@" in addr and domain and not re.search(r"[\s<>@,;]", domain):
                return domain
    except Exception:  # an unparseable From: simply has no domain
        return None
    return None


def _message_id(raw: bytes, fields: Sequence[HeaderField]) -> str:
    value = _first(raw, fields, "message-id")
    if value is None:
        return "-"
    text = re.sub(rb"\s+", b" ", value).strip().decode("ascii", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)[:200] or "-"


class _Extractor:
    """Walks one parsed message, collecting readable text and notes within the part/depth caps."""

    def __init__(self, notes: list[str]) -> None:
        self.notes = notes
        self.parts = 0

    def run(self, raw: bytes) -> str:
        """The readable body text; the subject comes from `read_header`."""
        try:
            msg = BytesParser(policy=compat32).parsebytes(raw)
        except RecursionError:
            # The stdlib parser recurses once per nesting level; past ~1,000 levels read the body raw.
            self.notes.append("MIME structure nested too deeply to parse; body read as raw text")
            msg = BytesHeaderParser(policy=compat32).parsebytes(raw)
            return _strip_mime_lines(_payload_text(msg, self.notes))
        return "\n\n".join(self.walk(msg, 0))

    def walk(self, part: Message, depth: int) -> list[str]:
        """Readable text pieces of `part`; a part that fails is skipped with a note."""
        self.parts += 1
        if self.parts > MAX_PARTS:
            self.notes.append(f"stopped after {MAX_PARTS} MIME parts")
            return []
        if depth > MAX_DEPTH:
            self.notes.append(f"MIME parts nested deeper than {MAX_DEPTH} levels skipped")
            return []
        try:
            return self._walk_part(part, depth)
        except Exception as exc:
            self.notes.append(f"broken MIME part skipped ({type(exc).__name__})")
            return []

    def _walk_part(self, part: Message, depth: int) -> list[str]:
        ctype = part.get_content_type()
        # Only a multipart's payload is read undecoded: compat32 decodes a string payload with the
        # declared charset, which raises for codecs such as idna.
        children = [p for p in part.get_payload() if isinstance(p, Message)] if part.is_multipart() else []
        if ctype in ("message/rfc822", "message/global"):
            return self._forwarded(part, children, depth)
        if part.is_multipart():
            if ctype == "multipart/alternative":
                return self._alternative(children, depth)
            return [text for child in children for text in self.walk(child, depth + 1)]
        if part.get_content_disposition() == "attachment" or ctype not in ("text/plain", "text/html"):
            if ctype.startswith("multipart/"):  # declared multipart without a usable boundary
                self.notes.append(f"{ctype} part without boundary read as text")
                return _nonblank([_payload_text(part, self.notes)])
            self.notes.append(f"attachment: {_filename(part) or 'unnamed'} ({ctype})")
            return []
        text = _payload_text(part, self.notes)
        return _nonblank([html_to_text(text) if ctype == "text/html" else text])

    def _forwarded(self, part: Message, inner: list[Message], depth: int) -> list[str]:
        """A forwarded message is read like the outer one: its subject, then its body."""
        if str(part.get("content-transfer-encoding", "")).strip().lower() == "base64":
            # The parser read the base64 text itself as a message without headers: decode, reparse.
            # Text after the base64 lines is read as text, as for a single part (`_base64_then_text`):
            # an unpadded message plus one odd line otherwise decoded to nothing at all.
            decoded, after = _split_base64(b"".join(_raw_payload(p) for p in inner))
            inner = [BytesParser(policy=compat32).parsebytes(decoded)]
        else:
            after = []
        pieces: list[str] = []
        for msg in inner:
            pieces += _nonblank([_forwarded_subject(msg)])
            pieces += self.walk(msg, depth + 1)
        return pieces + _nonblank([_decode_bytes(b"\n".join(after), None, self.notes)])

    def _alternative(self, children: list[Message], depth: int) -> list[str]:
        """text/plain if it says anything (spam often ships an empty one), else the richest other."""
        plain = next((c for c in children if c.get_content_type() == "text/plain"), None)
        if plain is not None:
            pieces = self.walk(plain, depth + 1)
            if pieces:
                return pieces
        others = [c for c in children if c is not plain]
        html = [c for c in others if c.get_content_type() == "text/html"]
        best = (html or others)[-1:] if others else []
        return [text for child in best for text in self.walk(child, depth + 1)]


def _forwarded_subject(msg: Message) -> str:
    """The decoded Subject of a forwarded message ("" when absent), as the MIME parser read it."""
    for key, value in msg.raw_items():
        if key.lower() == "subject":
            return _decode_subject(str(value).encode("utf-8", "surrogateescape"))
    return ""


def _filename(part: Message) -> str:
    try:
        name = part.get_filename()
    except Exception:
        return ""
    return _collapse(_decode_words(str(name))) if name else ""


def _payload_bytes(part: Message) -> bytes:
    """Transfer-decoded payload bytes; when decoding fails the raw bytes are still readable text."""
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes) and any(isinstance(defect, _BASE64_DEFECTS) for defect in part.defects):
        return _base64_then_text(_raw_payload(part))
    return data if isinstance(data, bytes) else _raw_payload(part)


def _raw_payload(part: Message) -> bytes:
    try:
        payload = part.get_payload()
    except Exception:
        return b""
    return payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""


_BASE64_DEFECTS = (
    errors.InvalidBase64LengthDefect,
    errors.InvalidBase64CharactersDefect,
    errors.InvalidBase64PaddingDefect,
)
_BASE64_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2}")


def _base64_then_text(payload: bytes) -> bytes:
    """A base64 body followed by plain text, read as mail clients show it: the base64 lines up to
    the first line that is not base64, decoded, then the rest as it is.

    A mailing list appends its footer to a single-part base64 body; the stdlib decoder then returns
    the base64 itself, or the message followed by the footer decoded as base64 garbage. A spammer
    can add such a line on purpose, so this matters beyond lists."""
    decoded, after = _split_base64(payload)
    return b"\n".join([decoded, *after])


def _split_base64(payload: bytes) -> tuple[bytes, list[bytes]]:
    """The leading base64 lines decoded (a partial last quantum dropped), and the lines after them."""
    lines = payload.splitlines()
    start = 0
    while start < len(lines) and not lines[start].strip():
        start += 1
    end = start
    while end < len(lines) and _BASE64_LINE.fullmatch(lines[end].strip()):
        end += 1
    encoded = b"".join(line.strip() for line in lines[start:end])
    try:
        decoded = binascii.a2b_base64(encoded[: len(encoded) - len(encoded) % 4])
    except binascii.Error:
        decoded = b""
    return decoded, lines[end:]


def _payload_text(part: Message, notes: list[str]) -> str:
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    return _decode_bytes(_payload_bytes(part), charset, notes)


def _decode_bytes(data: bytes, charset: str | None, notes: list[str] | None = None) -> str:
    """Decode with the declared charset; a wrong or unknown one gives replacement characters."""
    codec = _text_codec(charset)
    if charset and codec is None and notes is not None:
        notes.append(f"unknown charset {charset[:40]!r}, read as UTF-8")
    for name in ([codec] if codec else []) + ["utf-8"]:
        try:
            return data.decode(name)
        except Exception:
            continue
    fallback = codec or ("utf-8" if charset else "cp1252")  # undeclared 8-bit text is mostly Windows-1252
    try:
        return data.decode(fallback, "replace")
    except Exception:  # codecs such as idna refuse the "replace" handler
        return data.decode("utf-8", "replace")


def _text_codec(charset: str | None) -> str | None:
    if not charset:
        return None
    try:
        info = codecs.lookup(charset.strip().strip("\"'"))
    except Exception:
        return None
    return info.name if getattr(info, "_is_text_encoding", True) else None


_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,75})\?([bBqQ])\?([^?\s]*)\?=")


def _decode_words(text: str) -> str:
    """Decode RFC 2047 encoded-words; adjacent words of one charset are joined before decoding so a
    multi-byte character split across two words survives."""
    out: list[str] = []
    pending: tuple[str, bytes] | None = None
    pos = 0
    for match in _ENCODED_WORD.finditer(text):
        gap = text[pos : match.start()]
        charset = match.group(1).split("*", 1)[0]
        data = _encoded_word_bytes(match.group(2).lower(), match.group(3))
        if pending is not None and not gap.strip() and pending[0].lower() == charset.lower():
            pending = (pending[0], pending[1] + data)
        else:
            if pending is not None:
                out.append(_decode_bytes(pending[1], pending[0]))
                if gap.strip():
                    out.append(gap)
            else:
                out.append(gap)
            pending = (charset, data)
        pos = match.end()
    if pending is not None:
        out.append(_decode_bytes(pending[1], pending[0]))
    out.append(text[pos:])
    return "".join(out)


def _encoded_word_bytes(encoding: str, data: str) -> bytes:
    raw = data.encode("utf-8", "surrogateescape")
    try:
        if encoding == "q":
            return binascii.a2b_qp(raw, header=True)
        return binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        return raw


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


_MIME_LINE = re.compile(r"^(--\S*|content-[\w-]+:.*|mime-version:.*)$", re.I | re.M)


def _strip_mime_lines(body: str) -> str:
    return _MIME_LINE.sub("", body)


# HTML -> text. html.parser rescans to the end of the input for every unterminated construct
# (quadratic on hostile input), so comments/scripts/styles/declarations are removed and stray "<"
# escaped first with linear scans; what reaches the parser is only text and closed tags.
_INVISIBLE_START = re.compile(r"<!--|<(script|style)\b", re.I)
_INVISIBLE_END = {
    "script": re.compile(r"</script\b[^<>]{0,200}>", re.I),
    "style": re.compile(r"</style\b[^<>]{0,200}>", re.I),
}
_DECLARATION = re.compile(r"<[!?][^<>]{0,4000}>")
_STRAY_LT = re.compile(r"<(?!/?[A-Za-z][^<>]{0,4000}>)")
_BLOCK_TAGS = frozenset(
    {"address", "article", "aside", "blockquote", "br", "center", "dd", "div", "dl", "dt", "footer"}
    | {"form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "ol", "p", "pre", "section"}
    | {"table", "title", "tr", "ul"}
)
_CELL_TAGS = frozenset({"td", "th"})


def html_to_text(html: str) -> str:
    """Visible text of an HTML body: tags, scripts, styles and comments dropped, entities decoded,
    link text and image alt text kept (spam often hides its message in them)."""
    html = _STRAY_LT.sub("&lt;", _DECLARATION.sub(" ", _drop_invisible(html)))
    parser = _HTMLText()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # html.parser can still assert on odd markup: fall back to stripping tags
        return re.sub(r"<[^<>]*>", " ", html)
    return "".join(parser.out)


def _drop_invisible(html: str) -> str:
    out: list[str] = []
    pos = 0
    while (start := _INVISIBLE_START.search(html, pos)) is not None:
        out.append(html[pos : start.start()])
        if start.group(1) is None:
            end = html.find("-->", start.end())
            end = end + 3 if end >= 0 else -1
        else:
            close = _INVISIBLE_END[start.group(1).lower()].search(html, start.end())
            end = close.end() if close else -1
        if end < 0:  # unterminated: a browser would not show the rest either
            return "".join(out)
        out.append(" ")
        pos = end
    out.append(html[pos:])
    return "".join(out)


class _HTMLText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.out.append("\n")
        elif tag in _CELL_TAGS:
            self.out.append(" ")
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self.out.append(f" {alt} ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS and tag != "br":  # <br/> is one line break, not two
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        self.out.append(data)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _finish(text: str, notes: list[str]) -> str:
    """Tidy whitespace and cap the length, keeping head and tail like the classifier does."""
    text = _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = re.sub(r"[^\S\n]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if len(text) > MAX_TEXT_CHARS:
        half = MAX_TEXT_CHARS // 2
        text = f"{text[:half]}\n…\n{text[-half:]}"
        notes.append(f"text cut to {MAX_TEXT_CHARS} characters (head and tail kept)")
    return text


def _collapse(value: str) -> str:
    return " ".join(_CONTROL.sub(" ", value).split())


def _nonblank(pieces: list[str]) -> list[str]:
    return [p for p in pieces if p.strip()]


def _dedupe(notes: list[str]) -> list[str]:
    return list(dict.fromkeys(notes))
