"""message_to_text on the sample messages and on the MIME shapes real mail arrives in."""

import base64
import itertools
from pathlib import Path

import pytest

from spamfilterd.message import (
    MAX_HEADER_BYTES,
    MessageText,
    html_to_text,
    message_to_text,
    read_header,
)

DATA = Path(__file__).parent / "data" / "messages"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def sample(name: str) -> MessageText:
    return message_to_text((DATA / name).read_bytes())


def test_plain_utf8_email_reads_subject_then_body():
    result = sample("plain.eml")
    assert result.is_email
    assert result.subject == "Lunch on Friday?"
    assert result.text.startswith("Lunch on Friday?\n\nHi Tom,")
    assert "café next to the station has a\nlunch menu for 12 € — we could" in result.text
    assert "Received" not in result.text and "Message-ID" not in result.text
    assert result.notes == []


def test_html_only_drops_markup_scripts_styles_comments_and_decodes_entities():
    text = sample("html_only.eml").text
    assert "You have been selected to receive a £500 gift card & a free iPhone 16." in text
    assert "Click claim your prize now before it expires." in text  # link text kept
    assert "Limited time offer" in text  # img alt text kept
    for hidden in ("should-not-appear", "font-family", "display", "<", "&amp;", "&nbsp;", "DOCTYPE"):
        assert hidden not in text


def test_attachment_is_noted_not_read():
    result = sample("multipart_attachment.eml")
    assert "please find attached your invoice 2026-1142" in result.text
    assert "PDF" not in result.text and "JVBERi" not in result.text
    assert result.notes == ["attachment: invoice-2026-1142.pdf (application/pdf)"]


def test_latin1_quoted_printable_body_and_encoded_word_subject():
    result = sample("latin1.eml")
    assert result.subject == "Résumé de la réunion de jeudi"
    assert "le budget a été approuvé à l'unanimité.\nÀ bientôt, et bonne journée !" in result.text
    assert "\ufffd" not in result.text and "=E9" not in result.text


def test_gtube_string_survives_intact():
    assert GTUBE in sample("gtube.eml").text


def test_forwarded_message_contributes_its_subject_and_plain_text_once():
    text = sample("forwarded.eml").text
    assert text.startswith("Fwd: Urgent: verify your account\n\nIs this one real?")
    assert "\n\nUrgent: verify your account\n\nYour account has been limited." in text
    assert text.count("Your account has been limited") == 1  # HTML alternative not read twice


def test_sms_text_is_not_an_email():
    result = sample("sms.txt")
    assert not result.is_email and result.subject == ""
    assert result.text == (
        "WINNER!! You have won a £1000 prize. Call 09061701461 now to claim. Valid 12 hours only."
    )


def test_forged_spam_headers_are_not_part_of_the_text():
    text = sample("forged_headers.eml").text
    assert "X-Spam" not in text and "score=" not in text
    assert "Minutes from Tuesday's meeting\n\nHi all," in text


@pytest.mark.parametrize(
    "raw",
    [
        b"Hi: how are you",
        b"Hi: how are you\nSorry: I missed your call",
        b"Date: tomorrow at 5? ok",
        b"Subject: no blank line after a single header",
        b"From here on I will call you every day",
        b"Ok lar... Joking wif u oni...",
    ],
)
def test_chat_lines_that_look_a_bit_like_headers_stay_plain_text(raw):
    result = message_to_text(raw)
    assert not result.is_email and not read_header(raw).is_email
    assert result.text == raw.decode()


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: hello\n\nbody",
        b"From: a@example.org\nTo: b@example.org\n\nbody",
        b"From MAILER-DAEMON Thu Nov 26 10:00:00 2026\nFrom: a@example.org\nSubject: x\n\nbody",
        b"Received: from x\r\n\tby y\r\nSubject: hello\r\n\r\nbody",
        b"X-Custom: 1\nMIME-Version: 1.0\n\nbody",
    ],
)
def test_header_blocks_with_a_known_header_are_email(raw):
    result = message_to_text(raw)
    assert result.is_email and read_header(raw).is_email
    assert result.text.endswith("body")
    assert "From:" not in result.text and "Received" not in result.text


def test_plain_text_undeclared_latin1_reads_as_windows_1252():
    assert message_to_text("Prize £1000 – call now".encode("cp1252")).text == "Prize £1000 – call now"


def test_base64_body_with_declared_charset():
    raw = (
        b"Subject: b64\nMIME-Version: 1.0\nContent-Type: text/plain; charset=koi8-r\n"
        b"Content-Transfer-Encoding: base64\n\n" + base64.b64encode("Привет, мир".encode("koi8-r"))
    )
    assert message_to_text(raw).text == "b64\n\nПривет, мир"


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ("<p>Cheap meds, click now</p>", "Cheap meds, click now"),  # 30 bytes: no base64 padding
        ("<p>Cheap meds, click now!</p>\r\n", "Cheap meds, click now!"),  # padded
    ],
)
@pytest.mark.parametrize(
    "footer",
    [
        "_______________________________________________\nilug mailing list\nilug@linux.ie",
        "--\nsent via list xy",
        "unsubscribe",
    ],
)
def test_base64_body_followed_by_plain_text_reads_both(body, text, footer):
    """A list footer after a base64 body (SpamAssassin 2002 spam 00313): the stdlib decoder returns
    the base64 itself when the body has no padding, else the footer decoded as base64 garbage."""
    raw = b"Subject: offer\nContent-Type: text/html\nContent-Transfer-Encoding: base64\n\n"
    raw += base64.encodebytes(body.encode()) + b"\n" + footer.encode() + b"\n"
    assert message_to_text(raw).text == f"offer\n\n{text}\n\n{footer}"


def test_unknown_charset_gives_replacement_characters_and_a_note():
    raw = b"Subject: x\nContent-Type: text/plain; charset=x-no-such-charset\n\ncaf\xe9 ok"
    result = message_to_text(raw)
    assert result.text == "x\n\ncaf\ufffd ok"
    assert result.notes == ["unknown charset 'x-no-such-charset', read as UTF-8"]


def test_wrong_charset_never_raises():
    raw = b"Subject: x\nContent-Type: text/plain; charset=us-ascii\n\nna\xc3\xafve \xff\xfe"
    assert message_to_text(raw).text.startswith("x\n\nna")


def test_non_text_codec_names_are_not_used_as_charsets():
    raw = b"Subject: x\nContent-Type: text/plain; charset=base64\n\naGVsbG8="
    assert message_to_text(raw).text == "x\n\naGVsbG8="


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"=?UTF-8?B?8J+SsCBGcmVlIG1vbmV5?=", "💰 Free money"),
        (b"=?utf-8?q?caf=C3=A9?= =?utf-8?q?_cr=C3=A8me?=", "café crème"),
        (b"=?utf-8?b?w6k=?= =?utf-8?b?w6k=?=", "éé"),
        (b"=?utf-8?b?4oK=?= =?utf-8?b?rA==?=", "€"),  # one character split across two words
        (b"Re: =?iso-8859-1?q?R=E9ponse?= rapide", "Re: Réponse rapide"),
        (b"=?x-unknown?q?abc?=", "abc"),
        (b"=?utf-8?b?###?= kept", "kept"),
        (b"raw utf-8 \xc3\xa9t\xc3\xa9", "raw utf-8 été"),
        (b"raw latin-1 \xe9t\xe9", "raw latin-1 été"),
        (b"folded\n  over two lines", "folded over two lines"),
    ],
)
def test_subject_decoding(header, expected):
    result = message_to_text(b"From: a@example.org\nSubject: " + header + b"\n\nbody")
    assert result.subject == expected


def test_alternative_prefers_plain_but_falls_back_to_html_when_plain_is_empty():
    def alternative(plain: str) -> bytes:
        return (
            b'Subject: alt\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary="A"\n\n'
            b"--A\nContent-Type: text/plain\n\n" + plain.encode() + b"\n"
            b"--A\nContent-Type: text/html\n\n<p>rich <b>html</b> version</p>\n--A--\n"
        )

    assert message_to_text(alternative("plain version")).text == "alt\n\nplain version"
    assert message_to_text(alternative("  ")).text == "alt\n\nrich html version"


def test_alternative_with_related_html_and_inline_image():
    raw = (
        b'Subject: rel\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary="A"\n\n'
        b'--A\nContent-Type: multipart/related; boundary="R"\n\n'
        b"--R\nContent-Type: text/html; charset=utf-8\n\n<div>Only&nbsp;html &euro;5</div>\n"
        b"--R\nContent-Type: image/png\nContent-Disposition: inline\nContent-Transfer-Encoding: base64\n\n"
        b"iVBORw0KGgo=\n--R--\n--A--\n"
    )
    result = message_to_text(raw)
    assert result.text == "rel\n\nOnly html €5"
    assert result.notes == ["attachment: unnamed (image/png)"]


def test_text_attachment_is_skipped_and_encoded_filename_decoded():
    raw = (
        b'Subject: files\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="M"\n\n'
        b"--M\nContent-Type: text/plain\n\nsee attached\n"
        b"--M\nContent-Type: text/plain\n"
        b'Content-Disposition: attachment; filename="=?utf-8?q?r=C3=A9sum=C3=A9.txt?="'
        b"\n\nsecret attachment text\n--M--\n"
    )
    result = message_to_text(raw)
    assert result.text == "files\n\nsee attached"
    assert result.notes == ["attachment: résumé.txt (text/plain)"]


def test_base64_encoded_forwarded_message_is_parsed():
    inner = b"Subject: inner subject\nContent-Type: text/plain\n\ninner body\n"
    raw = (
        b'Subject: outer\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="M"\n\n'
        b"--M\nContent-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(inner)
        + b"--M--\n"
    )
    assert message_to_text(raw).text == "outer\n\ninner subject\n\ninner body"


@pytest.mark.parametrize("trailer", ["unsubscribe", "ab", "_____\nlist footer"])
def test_base64_forwarded_message_followed_by_plain_text_reads_both(trailer):
    """An unpadded base64 message plus one line that is not a multiple of 4 letters decoded to
    nothing: the forwarded spam vanished from what the classifier reads."""
    inner = b"Subject: inner subject\nContent-Type: text/plain\n\ncheap meds, now!\n"
    assert len(inner) % 3 == 0  # no padding: the stdlib decoder reads on into the trailer
    raw = (
        b'Subject: outer\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="M"\n\n'
        b"--M\nContent-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(inner)
        + f"\n{trailer}\n".encode()
        + b"--M--\n"
    )
    assert message_to_text(raw).text == f"outer\n\ninner subject\n\ncheap meds, now!\n\n{trailer}"


def test_max_bytes_truncates_and_notes_it():
    raw = b"Subject: big\n\n" + b"word " * 1000
    result = message_to_text(raw, max_bytes=100)
    assert result.notes == ["truncated at 100 bytes"]
    assert len(result.text) < 100
    assert message_to_text(b"hello", max_bytes=0).text == ""


def test_html_to_text_block_structure_and_entities():
    html = "<p>One&amp;two</p><ul><li>a</li><li>b</li></ul><table><tr><td>x</td><td>y</td></tr></table>"
    text = html_to_text(html)
    assert [line.strip() for line in text.split("\n") if line.strip()] == ["One&two", "a", "b", "x y"]
    assert html_to_text("line one<br/>line two<br>three") == "line one\nline two\nthree"
    assert html_to_text("a < b and 3 <4 but <3 you") == "a < b and 3 <4 but <3 you"
    assert html_to_text("before<!-- never closed") == "before"


@pytest.mark.parametrize(
    ("raw", "domain"),
    [
        (b"From: Anna <Anna.Berg@Example.ORG>\nSubject: x\n\nbody", "example.org"),
        (b"From: bob@mail.example.com\nTo: x@y.z\n", "mail.example.com"),
        (b"From: =?utf-8?q?J=C3=B6rg?= <j@example.de>\nSubject: x\n\n", "example.de"),
        (b'From: "Smith, John" <john@example.net>\nSubject: x\n\n', "example.net"),
        (b"Subject: no from\n\nbody", None),
        (b"From: not an address\nSubject: x\n\n", None),
        (b"From: \xff\xfe@\nSubject: x\n\n", None),
        (b"From: someone@ \nSubject: x\n\n", None),
        (b"Hi: from alice@example.org", None),
        (b"", None),
    ],
)
def test_header_from_domain(raw, domain):
    assert read_header(raw).from_domain == domain


def test_header_from_domain_of_samples():
    assert read_header((DATA / "plain.eml").read_bytes()).from_domain == "example.org"
    assert read_header((DATA / "sms.txt").read_bytes()).from_domain is None


@pytest.mark.parametrize(
    ("raw", "names", "subject", "domain", "message_id"),
    [
        (  # folded fields (CRLF) are one field each; a Message-ID in the body is not read
            b"Subject: Lunch\r\n\ton Friday\r\nFrom: A <a@Example.ORG>\r\nMessage-Id:\r\n <a@b>\r\n"
            b"\r\nMessage-ID: <body@x>\r\n",
            ["subject", "from", "message-id"],
            "Lunch on Friday",
            "example.org",
            "<a@b>",
        ),
        (  # bare LF; of two Subjects the first counts, as for a strict parser
            b"Subject: first\nSubject: second\nFrom: x@y.z\n\nbody\n",
            ["subject", "subject", "from"],
            "first",
            "y.z",
            "-",
        ),
        (  # RFC 2047 encoded words, in two charsets
            b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus =?ISO-8859-1?B?S/Zsbg==?=\nDate: today\n\n",
            ["subject", "date"],
            "Grüße aus Köln",
            None,
            "-",
        ),
        (b"", [], "", None, "-"),  # no header block at all
        (b"\r\nSubject: in the body\r\n", [], "", None, "-"),  # an empty header block
    ],
)
def test_read_header_reads_each_field_once_with_its_span(raw, names, subject, domain, message_id):
    header = read_header(raw)
    assert [field.name for field in header.fields] == names
    assert (header.subject, header.from_domain, header.message_id) == (subject, domain, message_id)
    assert header.raw == raw
    spans = [(field.start, field.end) for field in header.fields]
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(spans))  # adjacent
    assert all(raw[f.start : f.colon].lower() == f.name.encode() for f in header.fields)


def test_read_header_stops_at_the_byte_cap():
    """Bounded work: past MAX_HEADER_BYTES no field is read; what lies beyond counts as body."""
    filler = b"X-Filler: 0123456789\n" * (MAX_HEADER_BYTES // 21 + 1)
    header = read_header(b"Subject: early\n" + filler + b"Message-ID: <late@x>\n\nbody\n")
    assert header.fields[-1].end <= MAX_HEADER_BYTES
    assert header.subject == "early" and header.message_id == "-"
