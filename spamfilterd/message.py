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
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from email.policy import compat32
from html.parser import HTMLParser

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
_FIELD_LINE = re.compile(rb"([!-9;-~]+)[ \t]*:")
_HEADER_SCAN_BYTES = 65_536
_HEADER_SCAN_LINES = 500
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


@dataclass
class MessageText:
    """What the classifier reads, plus what was left out and why (for logs and `--format json`)."""

    text: str
    subject: str
    is_email: bool
    notes: list[str] = field(default_factory=list)


def message_to_text(raw: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> MessageText:
    """Turn an email or a bare SMS into classifier text; never raises, work bounded by `max_bytes`."""
    raw = bytes(raw)
    notes: list[str] = []
    max_bytes = max(0, max_bytes)
    if len(raw) > max_bytes:
        raw = raw[:max_bytes]
        notes.append(f"truncated at {max_bytes} bytes")
    if _header_fields(raw) is None:
        return MessageText(_finish(_decode_bytes(raw, None), notes), "", False, _dedupe(notes))
    try:
        subject, body = _Extractor(notes).run(raw)
    except Exception as exc:  # last line of defence: a parser bug must not lose the message
        notes.append(f"could not parse as email ({type(exc).__name__}); read as plain text")
        subject, body = "", _decode_bytes(raw, None)
    text = f"{subject}\n\n{body}" if subject else body
    return MessageText(_finish(text, notes), subject, True, _dedupe(notes))


def is_mbox_from_line(line: bytes) -> bool:
    """True for a real mbox `From_` line (sender and date): a text that merely starts with
    "From " ("From tomorrow onwards ...") is a message, not an mbox."""
    return _MBOX_FROM.fullmatch(line[:1000]) is not None


def looks_like_email(raw: bytes) -> bool:
    """Cheap check (header lines only) that `raw` is an email rather than a bare SMS/plain text,
    by the same rule `message_to_text` uses; pipe mode needs it to know where headers can go."""
    try:
        return _header_fields(bytes(raw)) is not None
    except Exception:
        return False


def header_from_domain(raw: bytes) -> str | None:
    """Lowercased domain of the From: address, for rules that allow/deny by sender domain."""
    try:
        fields = _header_fields(bytes(raw))
        value = next((v for name, v in fields or [] if name == "from"), None)
        if value is None:
            return None
        text = _decode_words(_unfold(_decode_bytes(value, None)))
        for _name, addr in email.utils.getaddresses([text]):
            domain = addr.rpartition("@")[2].strip().strip(".").lower()
            if "@" in addr and domain and not re.search(r"[\s<>@,;]", domain):
                return domain
    except Exception:  # an unparseable From: simply has no domain
        return None
    return None


def _header_fields(raw: bytes) -> list[tuple[str, bytes]] | None:
    """The leading header block as (lowercased name, raw value), or None when it is not an email.

    An email needs a well-known header name and either two fields or a blank line after one, so
    that a text such as "Date: tomorrow?" or "Hi: how are you" stays a plain message.
    """
    lines = raw[:_HEADER_SCAN_BYTES].split(b"\n")[: _HEADER_SCAN_LINES + 1]
    if lines and is_mbox_from_line(lines[0]):
        lines = lines[1:]
    fields: list[tuple[str, bytes]] = []
    blank_after = False
    for line in lines:
        line = line.rstrip(b"\r")
        if not line:
            blank_after = True
            break
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + line)
            continue
        match = _FIELD_LINE.match(line)
        if match is None:
            break
        fields.append((match.group(1).decode("ascii").lower(), line[match.end() :].strip()))
    if not any(name in _KNOWN_HEADERS for name, _ in fields):
        return None
    if len(fields) < 2 and not blank_after:
        return None
    return fields


class _Extractor:
    """Walks one parsed message, collecting readable text and notes within the part/depth caps."""

    def __init__(self, notes: list[str]) -> None:
        self.notes = notes
        self.parts = 0

    def run(self, raw: bytes) -> tuple[str, str]:
        try:
            msg = BytesParser(policy=compat32).parsebytes(raw)
        except RecursionError:
            # The stdlib parser recurses once per nesting level; past ~1,000 levels read the body raw.
            self.notes.append("MIME structure nested too deeply to parse; body read as raw text")
            msg = BytesHeaderParser(policy=compat32).parsebytes(raw)
            return _subject(msg), _strip_mime_lines(_payload_text(msg, self.notes))
        return _subject(msg), "\n\n".join(self.walk(msg, 0))

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
            encoded = b"".join(_payload_bytes(p) for p in inner)
            try:
                decoded = binascii.a2b_base64(encoded)
            except binascii.Error:
                decoded = b""
            inner = [BytesParser(policy=compat32).parsebytes(decoded)]
        pieces: list[str] = []
        for msg in inner:
            pieces += _nonblank([_subject(msg)])
            pieces += self.walk(msg, depth + 1)
        return pieces

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


def _subject(msg: Message) -> str:
    """The decoded Subject ("" when absent), robust to raw 8-bit bytes and bad encoded-words."""
    for key, value in msg.raw_items():
        if key.lower() == "subject":
            raw = str(value).encode("utf-8", "surrogateescape")
            return _collapse(_decode_words(_unfold(_decode_bytes(raw, None))))[:MAX_SUBJECT_CHARS]
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
    if isinstance(data, bytes):
        return data
    try:
        payload = part.get_payload()
    except Exception:
        return b""
    return payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""


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
