"""No input bytes may crash message_to_text or make it slow: property tests plus hostile cases."""

import base64
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spamfilterd.message import (
    MAX_DEPTH,
    MAX_PARTS,
    MAX_TEXT_CHARS,
    MessageText,
    html_to_text,
    message_to_text,
    read_header,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT_LIMIT = MAX_TEXT_CHARS + 3  # head + "\n…\n" + tail


def check(result: MessageText) -> None:
    assert isinstance(result, MessageText)
    assert isinstance(result.text, str) and len(result.text) <= TEXT_LIMIT
    assert isinstance(result.subject, str) and isinstance(result.is_email, bool)
    assert all(isinstance(note, str) for note in result.notes)
    result.text.encode("utf-8")  # no lone surrogates: the tokenizer must be able to read it
    result.subject.encode("utf-8")


header_names = st.sampled_from(
    ["From", "To", "Subject", "Date", "Received", "Message-ID", "MIME-Version", "Content-Type", "X-Junk"]
) | st.from_regex(r"\A[!-9;-~]{1,20}\Z")
header_values = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b" ")),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(
        lambda cs, enc, data: b"=?%s?%s?%s?=" % (cs.encode(), enc.encode(), data),
        st.sampled_from(["utf-8", "iso-8859-1", "x-bogus", "utf-16", "base64", "idna", ""]),
        st.sampled_from(["q", "B", "x"]),
        st.binary(max_size=30).map(lambda b: b.replace(b"?", b"").replace(b"\n", b"")),
    ),
)
charsets = st.sampled_from(["utf-8", "iso-8859-1", "x-bogus", "utf-16", "base64", "idna", "", '"', "utf-7"])
encodings = st.sampled_from(["7bit", "8bit", "base64", "quoted-printable", "x-uuencode", "bogus", ""])
leaf_types = st.sampled_from(["text/plain", "text/html", "application/pdf", "image/png", "message/rfc822"])


@st.composite
def leaf(draw) -> bytes:
    body = draw(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
    if draw(st.booleans()):
        body = base64.encodebytes(body)
    disposition = draw(st.sampled_from([b"", b"Content-Disposition: attachment; filename=x.bin\n"]))
    return b"Content-Type: %s; charset=%s\nContent-Transfer-Encoding: %s\n%s\n%s" % (
        draw(leaf_types).encode(),
        draw(charsets).encode(),
        draw(encodings).encode(),
        disposition,
        body,
    )


def multipart(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw) -> bytes:
        boundary = draw(st.sampled_from([b"b1", b"b2", b"", b"=?x", b"b1"]))
        kind = draw(st.sampled_from([b"mixed", b"alternative", b"related"]))
        parts = draw(st.lists(children, max_size=4))
        body = b"".join(b"--%s\n%s\n" % (boundary, part) for part in parts)
        if draw(st.booleans()):  # a proper close, or a broken/missing one
            body += b"--%s--\n" % boundary
        return b'Content-Type: multipart/%s; boundary="%s"\n\n%s' % (kind, boundary, body)

    return build()


mime_trees = st.recursive(leaf(), multipart, max_leaves=8)


@st.composite
def emails(draw) -> bytes:
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=6))
    head = b"".join(b"%s: %s\n" % (name.encode(), value) for name, value in headers)
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    return (b"From: a@example.org\nSubject: fuzz\n" + head + draw(mime_trees)).replace(b"\n", newline)


@FUZZ
@given(st.binary(max_size=4000))
def test_arbitrary_bytes_never_raise(raw):
    result = message_to_text(raw)
    check(result)
    header = read_header(raw)
    assert header.is_email == result.is_email and header.raw == raw
    domain = header.from_domain
    assert domain is None or domain == domain.lower()


@FUZZ
@given(emails(), st.integers(min_value=0, max_value=5000))
def test_arbitrary_mime_messages_never_raise(raw, max_bytes):
    check(message_to_text(raw))
    check(message_to_text(raw, max_bytes=max_bytes))
    assert read_header(raw).from_domain == "example.org"


@FUZZ
@given(st.text(alphabet=st.sampled_from("<>/!-?&#;=\"' abpscriptstyle[]CDATA\n"), max_size=300))
def test_html_to_text_never_raises_on_markup_soup(html):
    assert isinstance(html_to_text(html), str)


H = b"From: a@example.org\nSubject: nasty\nMIME-Version: 1.0\n"


def nested_multipart(depth: int) -> bytes:
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(depth)
    )
    closing = b"".join(b"--b%d--\n" % i for i in reversed(range(depth)))
    return H + opening + b"Content-Type: text/plain\n\ndeep text\n" + closing


def nested_rfc822(depth: int) -> bytes:
    body = b"Content-Type: text/plain\n\ndeep text\n"
    for i in range(depth):
        body = b"Subject: fwd %d\nContent-Type: message/rfc822\n\n" % i + body
    return H + body


def sibling_parts(count: int) -> bytes:
    part = b"--s\nContent-Type: text/plain\n\nhello\n"
    return H + b'Content-Type: multipart/mixed; boundary="s"\n\n' + part * count + b"--s--\n"


def html_body(body: bytes) -> bytes:
    return H + b"Content-Type: text/html\n\n" + body


MB = 1_048_576
NASTY = {
    "empty": b"",
    "only headers": H,
    "only headers, no newline": b"From: a@example.org\nSubject: x",
    "binary junk": bytes(range(256)) * 64,
    "nul bytes": H + b"\n" + b"\x00" * 10_000 + b"text\x00after",
    "invalid utf-8 headers": b"From: \xff\xfe\xc3(\nSubject: \xed\xa0\x80 \xf0\x28\x8c\x28\n\nbody \xc3\x28",
    "broken boundary": H + b'Content-Type: multipart/mixed; boundary="x"\n\n--y\nhello\n--x-\n',
    "multipart without boundary": H + b"Content-Type: multipart/mixed\n\njust text\n",
    "empty boundary": H + b'Content-Type: multipart/mixed; boundary=""\n\n--\n\nhi\n----\n',
    "unterminated multipart": H + b'Content-Type: multipart/mixed; boundary="x"\n\n--x\n\n',
    "bad base64": H + b"Content-Transfer-Encoding: base64\n\n!!!*** abc=== =",
    "bad quoted-printable": H + b"Content-Transfer-Encoding: quoted-printable\n\n=ZZ=\n=0=",
    "bad uuencode": H + b"Content-Transfer-Encoding: x-uuencode\n\nbegin 644 x\n!!!!\n",
    "bad rfc2231 filename": H
    + b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: application/pdf\n"
    b"Content-Disposition: attachment; filename*=x-bogus'en'%FF%FE\n\n%PDF\n--b--\n",
    "crlf and bare cr": H.replace(b"\n", b"\r\n") + b"\r\nline\rline\r\n",
    "10 MB body": H + b"\n" + b"buy cheap pills now " * 524_288,
    "10 MB html tags": html_body(b"<a " * 3_500_000),
    "html unclosed comments": html_body(b"<!-- x >" * 200_000),
    "html lone brackets": html_body(b"<" * MB),
    "html declarations": html_body(b"<!" * 500_000),
    "huge subject": b"From: a@example.org\nSubject: " + b"=?utf-8?b?" * 200_000 + b"\n\nx",
    "1,000 nested multiparts": nested_multipart(1000),
    "1,000 sibling parts": sibling_parts(1000),
    "1,000 nested forwarded messages": nested_rfc822(1000),
}


@pytest.mark.parametrize("raw", NASTY.values(), ids=NASTY.keys())
def test_nasty_inputs_are_handled_quickly(raw):
    start = time.perf_counter()
    result = message_to_text(raw)
    elapsed = time.perf_counter() - start
    check(result)
    assert elapsed < 10, f"took {elapsed:.1f} s"  # about 1 s on a busy 2-core machine


def test_ten_megabyte_body_is_cut_at_max_bytes():
    result = message_to_text(NASTY["10 MB body"])
    assert result.notes[0] == f"truncated at {MB} bytes"
    assert result.text.startswith("nasty\n\nbuy cheap pills now")
    assert len(result.text) == TEXT_LIMIT


def test_part_count_is_capped():
    result = message_to_text(sibling_parts(1000))
    assert f"stopped after {MAX_PARTS} MIME parts" in result.notes
    assert result.text.count("hello") == MAX_PARTS - 1  # the outer multipart counts as one part


def test_nesting_depth_is_capped_but_shallow_text_still_read():
    shallow = message_to_text(nested_multipart(MAX_DEPTH - 1))
    assert shallow.text.endswith("deep text") and shallow.notes == []
    deep = message_to_text(nested_multipart(MAX_DEPTH + 5))
    assert deep.text == "nasty"
    assert deep.notes == [f"MIME parts nested deeper than {MAX_DEPTH} levels skipped"]


def test_nesting_too_deep_for_the_stdlib_parser_falls_back_to_raw_body():
    result = message_to_text(nested_multipart(1000))
    assert result.notes == ["MIME structure nested too deeply to parse; body read as raw text"]
    assert result.text.endswith("deep text")
    assert "Content-Type" not in result.text and "--b1" not in result.text


def test_nul_bytes_become_spaces():
    assert message_to_text(b"free\x00prize\x00\x00now").text == "free prize now"
