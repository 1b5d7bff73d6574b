"""Header surgery on raw bytes: forged headers go, ours arrive, the body never changes."""

import email

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spamfilterd.message import MAX_HEADER_BYTES, read_header
from spamfilterd.rules import Decision
from spamfilterd.tagging import original_recipients_header, rewrite_headers, status_headers

BODY = b"Hello,\r\n\r\nX-Spam-Flag: YES in the body stays.\r\n=?utf-8?q?not_a_header?=\r\n"
CRLF_MESSAGE = (
    b"Received: from a by b;\r\n\tThu, 26 Nov 2026 10:00:00 +0000\r\n"
    b"X-Spam-Flag: NO\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"x-spam-status: No, score=0.000\r\n\tforged=yes\r\n"
    b"Subject: Lunch?\r\n"
    b"X-SPAM-Level: \r\n"
    b"X-Spam-Score : -5\r\n"
    b"X-Spam-Report: kept, not ours\r\n"
    b"\r\n" + BODY
)

# Pieces that build malformed header blocks: forged flags, bare CRs, mbox lines, folding.
NASTY = [
    b"X-Spam-Flag: NO",
    b"x-spam-flag:NO",
    b"X-Spam-Flag :NO",
    b"Subject: x",
    b"=?utf-8?q?a?=",
    b"From ",
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b"a",
]


def _headers(message: bytes) -> email.message.Message:
    return email.message_from_bytes(message)


def test_forged_headers_are_stripped_with_their_continuations_and_body_is_byte_identical():
    out = rewrite_headers(CRLF_MESSAGE, [("X-Spam-Flag", "YES")])
    head, _, body = out.partition(b"\r\n\r\n")
    assert body == BODY
    assert b"forged=yes" not in head
    assert b"X-Spam-Score" not in head and b"X-SPAM-Level" not in head
    assert head.count(b"X-Spam-Flag") == 1
    assert b"X-Spam-Report: kept, not ours" in head
    assert head.startswith(b"X-Spam-Flag: YES\r\nReceived: from a by b;\r\n\tThu, 26 Nov 2026")
    assert b"\n" not in out.replace(b"\r\n", b"")  # no bare LF introduced
    assert _headers(out)["X-Spam-Flag"] == "YES"


def test_lf_messages_stay_lf_and_new_headers_go_first():
    raw = b"From: a@b.c\nSubject: hi\n\nbody\n"
    out = rewrite_headers(raw, [("X-Spam-Flag", "NO"), ("X-Spam-Score", "0.100")])
    assert out == b"X-Spam-Flag: NO\nX-Spam-Score: 0.100\nFrom: a@b.c\nSubject: hi\n\nbody\n"


def test_mbox_from_line_stays_first():
    raw = b"From alice@example.com Thu Nov 26 10:00:00 2026\nSubject: hi\n\nbody\n"
    out = rewrite_headers(raw, [("X-Spam-Flag", "NO")])
    assert out == b"From alice@example.com Thu Nov 26 10:00:00 2026\nX-Spam-Flag: NO\nSubject: hi\n\nbody\n"


def test_a_first_line_starting_with_from_is_kept_in_place_only_if_it_is_an_mbox_line():
    chat = b"From tomorrow onwards eve 6 to 3 work.\nSubject: x\n\nbody\n"
    assert rewrite_headers(chat, [("X-A", "1")]) == b"X-A: 1\n\n" + chat
    from_line = b"From - Thu Nov 26 10:00:00 2026\n"
    mbox = from_line + b"Subject: x\n\nbody\n"
    assert rewrite_headers(mbox, [("X-A", "1")]) == from_line + b"X-A: 1\nSubject: x\n\nbody\n"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"WINNER!! Call 09061701461 now: claim", b"X-A: 1\n\nWINNER!! Call 09061701461 now: claim"),
        (b"", b"X-A: 1\n"),
        (b"Subject: only headers", b"X-A: 1\nSubject: only headers"),
        (b"Subject: x\r\nno blank line here\r\n", b"X-A: 1\r\nSubject: x\r\n\r\nno blank line here\r\n"),
        (b"From x\rX-Spam-Flag: NO\n\nb", b"X-A: 1\n\nFrom x\rX-Spam-Flag: NO\n\nb"),
        (b"\nbody after empty header block", b"X-A: 1\n\nbody after empty header block"),
    ],
)
def test_messages_without_a_proper_header_block(raw, expected):
    assert rewrite_headers(raw, [("X-A", "1")]) == expected


def test_known_bare_text_is_never_read_as_headers():
    raw = b"Urgent: you have won a prize\nCall now"
    out = rewrite_headers(raw, [("X-Spam-Flag", "YES")], bare_text=True)
    assert out == b"X-Spam-Flag: YES\n\n" + raw


def test_bare_text_body_is_preserved_exactly():
    raw = "Ur awarded a £2000 bonus!\nReply STOP".encode("latin-1")
    out = rewrite_headers(raw, [("X-Spam-Flag", "YES")], subject_prefix="[SPAM] ")
    assert out.split(b"\n\n", 1)[1] == raw
    assert _headers(out)["Subject"] == "[SPAM]"


@pytest.mark.parametrize(
    ("subject_line", "expected"),
    [
        (b"Subject: Cheap meds", b"Subject: [SPAM] Cheap meds"),
        (b"SUBJECT:Cheap meds", b"SUBJECT: [SPAM] Cheap meds"),
        (b"Subject: [SPAM] Cheap meds", b"Subject: [SPAM] Cheap meds"),
        (b"Subject: [spam] Cheap meds", b"Subject: [spam] Cheap meds"),
        (b"Subject: =?UTF-8?B?W1NQQU1dIENoZWFw?=", b"Subject: =?UTF-8?B?W1NQQU1dIENoZWFw?="),
        (b"Subject: =?UTF-8?B?R8O8bnN0aWc=?=", b"Subject: [SPAM] =?UTF-8?B?R8O8bnN0aWc=?="),
        (b"Subject:\r\n =?iso-8859-1?q?G=FCnstig?=", b"Subject: [SPAM]\r\n =?iso-8859-1?q?G=FCnstig?="),
    ],
)
def test_subject_prefix(subject_line, expected):
    raw = b"From: x@y.z\r\n" + subject_line + b"\r\n\r\nbody\r\n"
    out = rewrite_headers(raw, [], subject_prefix="[SPAM] ")
    assert out == b"From: x@y.z\r\n" + expected + b"\r\n\r\nbody\r\n"


def test_prefix_without_trailing_space_gets_one():
    """YAML drops trailing spaces: `subject-prefix: "[SPAM]"` must not glue to the subject."""
    out = rewrite_headers(b"Subject: Cheap meds\n\nbody\n", [], subject_prefix="[SPAM]")
    assert out == b"Subject: [SPAM] Cheap meds\n\nbody\n"


def test_encoded_subject_decodes_with_prefix_in_front():
    raw = b"Subject: =?UTF-8?B?R8O8bnN0aWc=?=\n\nbody\n"
    out = rewrite_headers(raw, [], subject_prefix="***SPAM***")
    assert read_header(out).subject == "***SPAM*** Günstig"


def test_only_first_subject_is_rewritten_and_missing_subject_is_added():
    raw = b"Subject: one\nSubject: two\n\nb\n"
    assert rewrite_headers(raw, [], subject_prefix="[SPAM] ") == b"Subject: [SPAM] one\nSubject: two\n\nb\n"
    assert rewrite_headers(b"From: a@b.c\n\nb\n", [], subject_prefix="[SPAM] ") == (
        b"Subject: [SPAM]\nFrom: a@b.c\n\nb\n"
    )


def test_status_headers_shape():
    decision = Decision(verdict="spam", score=0.9871, actions=("tag",), rule="spam")
    headers = dict(status_headers(decision, required=0.5, model_id="sms-gpt-mini@3fa2b1c0d9e8"))
    assert headers == {
        "X-Spam-Flag": "YES",
        "X-Spam-Status": (
            "Yes, score=0.987 required=0.500 verdict=spam rule=spam model=sms-gpt-mini@3fa2b1c0d9e8"
        ),
        "X-Spam-Score": "0.987",
        "X-Spam-Level": "*********",
        "X-Spam-Model": "sms-gpt-mini@3fa2b1c0d9e8",
    }
    ham = Decision(verdict="ham", score=0.0, actions=("accept",), rule="default", gtube=False)
    assert dict(status_headers(ham, 0.5, "m"))["X-Spam-Level"] == ""
    gtube = Decision(verdict="spam", score=1.0, actions=("accept",), rule="r", gtube=True)
    status = dict(status_headers(gtube, 0.5, "m"))
    assert status["X-Spam-Flag"] == "NO" and status["X-Spam-Status"].endswith(" tests=GTUBE")
    assert status["X-Spam-Level"] == "**********"


def test_header_values_cannot_inject_lines_and_recipient_lists_fold():
    recipients = tuple(f"user{i}@example.com" for i in range(30))
    out = rewrite_headers(
        b"Subject: x\r\n\r\nb",
        [("X-Spam-Model", "evil\r\nBcc: all@x"), original_recipients_header(recipients)],
    )
    assert b"\r\nBcc:" not in out
    lines = out.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert all(len(line) <= 78 for line in lines if b"Spam-Model" not in line)
    parsed = _headers(out)
    assert parsed["X-Spam-Original-Recipients"].replace("\r\n", "") == ", ".join(recipients)


def test_sixty_recipients_are_all_kept_in_the_folded_header():
    """The list was cut at 900 characters: 24 of 60 recipients survived a redirect."""
    recipients = tuple(f"recipient-number-{i:02d}@department.example.com" for i in range(60))
    out = rewrite_headers(b"Subject: x\r\n\r\nb", [original_recipients_header(recipients)])
    head = out.split(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    value = _headers(out)["X-Spam-Original-Recipients"].replace("\r\n", "")
    assert value.split(", ") == list(recipients)


def test_header_scan_stops_at_the_cap_and_leaves_the_rest_in_place_as_body():
    """Bounded work whatever the header: past MAX_HEADER_BYTES nothing is parsed, the remaining
    lines stay in place behind a blank line, so no parser reads a forged flag there as a header."""
    cap = MAX_HEADER_BYTES
    filler = b"X-Filler: 0123456789\r\n" * (cap // 22 + 1)
    inside, beyond = filler[: filler.rfind(b"\r\n", 0, cap) + 2], filler[len(filler) // 2 :]
    raw = inside + beyond + b"X-Spam-Flag: NO\r\nSubject: late\r\n\r\n" + BODY
    out = rewrite_headers(raw, [("X-Spam-Flag", "YES")], subject_prefix="[SPAM] ")
    assert out == b"X-Spam-Flag: YES\r\nSubject: [SPAM]\r\n" + inside + b"\r\n" + raw[len(inside) :]
    assert _headers(out).get_all("X-Spam-Flag") == ["YES"]


def test_a_forged_field_folded_over_many_lines_goes_whole():
    folded = b"X-Spam-Status: No, forged\n" + b" y\n" * 20_000 + b"\t\r\n z"
    out = rewrite_headers(b"Subject: s\n" + folded + b"\nTo: b@c.d\n\nbody\n", [("X-Spam-Flag", "YES")])
    assert out == b"X-Spam-Flag: YES\nSubject: s\nTo: b@c.d\n\nbody\n"


def test_status_header_stays_on_one_line():
    status = "Yes, score=0.987 required=0.500 verdict=spam rule=a-rather-long-rule-name model=" + "m" * 60
    out = rewrite_headers(b"Subject: x\n\nb", [("X-Spam-Status", status)])
    assert out == b"X-Spam-Status: " + status.encode() + b"\nSubject: x\n\nb"


def test_headers_hidden_behind_a_bare_cr_or_a_blank_before_the_colon_are_removed():
    raw = b"Subject: hi\rX-Spam-Flag: NO\nX-Spam-Score : -9\nTo: b@c.d\n\nbody"
    assert rewrite_headers(raw, [("X-Spam-Flag", "YES")]) == b"X-Spam-Flag: YES\nTo: b@c.d\n\nbody"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(NASTY), max_size=25).map(b"".join), st.booleans())
def test_any_bytes_leave_exactly_our_flag_for_a_parser(raw, bare_text):
    out = rewrite_headers(raw, [("X-Spam-Flag", "YES")], subject_prefix="[SPAM] ", bare_text=bare_text)
    assert email.message_from_bytes(out).get_all("X-Spam-Flag") == ["YES"]
