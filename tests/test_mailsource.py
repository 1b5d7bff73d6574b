"""iter_messages on real maildirs, mbox files, folders and single files."""

import mailbox
import os
import shutil
from pathlib import Path

import pytest

from spamfilterd.mailsource import MailSourceError, iter_messages

DATA = Path(__file__).parent / "data" / "messages"
SAMPLES = sorted(p for p in DATA.iterdir() if p.suffix == ".eml")


def test_single_message_file_yields_its_exact_bytes():
    path = DATA / "plain.eml"
    assert list(iter_messages(path)) == [(str(path), path.read_bytes())]


def test_single_sms_text_file():
    path = DATA / "sms.txt"
    assert list(iter_messages(path)) == [(str(path), path.read_bytes())]


def test_mbox_yields_each_message_without_the_envelope_line(tmp_path):
    path = tmp_path / "spam.mbox"
    box = mailbox.mbox(path)
    for sample in SAMPLES[:3]:
        box.add(sample.read_bytes())
    box.close()
    messages = list(iter_messages(path))
    assert [name for name, _ in messages] == [f"{path}#1", f"{path}#2", f"{path}#3"]
    for (_, raw), sample in zip(messages, SAMPLES[:3], strict=True):
        assert not raw.startswith(b"From ")
        assert raw.rstrip(b"\n") == sample.read_bytes().rstrip(b"\n")


def test_hand_written_mbox_with_quoted_from_line_is_kept_as_stored(tmp_path):
    path = tmp_path / "inbox"
    path.write_bytes(
        b"From alice@example.org Thu Nov 26 10:00:00 2026\nSubject: one\n\nhello\n>From the start\n\n"
        b"From bob@example.org Thu Nov 26 10:01:00 2026\nSubject: two\n\nworld\n"
    )
    assert list(iter_messages(path)) == [
        (f"{path}#1", b"Subject: one\n\nhello\n>From the start\n"),  # separator line dropped
        (f"{path}#2", b"Subject: two\n\nworld\n"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        b"From tomorrow onwards eve 6 to 3 work.",
        b"From here on I will call you every day\nSubject: not a header either\n",
        b"From: alice@example.org\nSubject: a header, not an mbox line\n\nhi\n",
        b"From alice@example.org yesterday: call me\n",
    ],
)
def test_a_file_starting_with_from_but_no_from_line_is_one_message(tmp_path, text):
    """Only a real `From_` line (sender and date) makes an mbox; this text was read as an empty
    mbox message named FILE#1."""
    path = tmp_path / "sms.txt"
    path.write_bytes(text)
    assert list(iter_messages(path)) == [(str(path), text)]


@pytest.mark.parametrize(
    "from_line",
    [
        b"From MAILER-DAEMON Fri Jul  8 12:08:34 2011",  # Python's mailbox, mail spools
        b"From - Thu Nov 26 10:00:00 2026",  # Thunderbird
        b"From 1234567890@xxx Mon Mar 22 15:30:46 +0000 2021",  # Gmail Takeout
        b"From alice@example.org Thu Nov 26 10:00:00 2026 +0100",
        b"From bob Tue Jan  4 10:31 2000 remote from uucp",
        b"From carol@example.org Thu Nov 26 10:00:00 CET 2026\r",
        b"From dave@example.org Thu, 26 Nov 2026 10:00:00 +0000",  # an RFC 5322 date
    ],
)
def test_mbox_from_line_variants_are_recognised(tmp_path, from_line):
    path = tmp_path / "box"
    path.write_bytes(from_line + b"\nSubject: one\n\nhello\n")
    (name, raw), *rest = iter_messages(path)
    assert (name, rest) == (f"{path}#1", [])
    assert raw.endswith(b"Subject: one\n\nhello\n")


def test_maildir_reads_new_then_cur_and_skips_tmp_and_subfolders(tmp_path):
    root = tmp_path / "Maildir"
    box = mailbox.Maildir(root)
    for sample in SAMPLES[:2]:
        box.add(mailbox.MaildirMessage(sample.read_bytes()))
    seen = mailbox.MaildirMessage((DATA / "gtube.eml").read_bytes())
    seen.set_subdir("cur")
    seen.set_flags("S")
    box.add(seen)
    box.add_folder("Spam").add((DATA / "sms.txt").read_bytes())  # Maildir++ ".Spam" folder
    (root / "tmp" / "half-delivered").write_bytes(b"Subject: partial")
    messages = list(iter_messages(root))
    names = [Path(name).relative_to(root).parts[0] for name, _ in messages]
    assert names == ["new", "new", "cur"]
    assert sorted(raw for _, raw in messages[:2]) == sorted(s.read_bytes() for s in SAMPLES[:2])
    assert messages[2][1] == (DATA / "gtube.eml").read_bytes()
    assert messages[2][0].endswith(":2,S")


def test_folder_of_eml_files_recursive_sorted_without_dotfiles(tmp_path):
    for sample in SAMPLES:
        shutil.copy(sample, tmp_path / sample.name)
    (tmp_path / "sub").mkdir()
    shutil.copy(DATA / "sms.txt", tmp_path / "sub" / "a.txt")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.eml").write_bytes(b"Subject: hidden")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")
    names = [name for name, _ in iter_messages(tmp_path)]
    expected = [*(s.name for s in SAMPLES), "sub/a.txt"]
    assert names == [str(tmp_path / name) for name in sorted(expected)]


def test_folder_holding_an_mbox_and_a_maildir(tmp_path):
    mailbox.Maildir(tmp_path / "md").add((DATA / "plain.eml").read_bytes())
    box = mailbox.mbox(tmp_path / "archive.mbox")
    box.add((DATA / "latin1.eml").read_bytes())
    box.close()
    names = [name for name, _ in iter_messages(tmp_path)]
    assert names[0] == f"{tmp_path / 'archive.mbox'}#1"
    assert Path(names[1]).parent == tmp_path / "md" / "new"
    assert len(names) == 2


def test_missing_path_names_the_path_and_what_to_pass(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(MailSourceError, match=r"nope: no such file or folder; pass a message file, an mbox"):
        list(iter_messages(missing))


def test_stdin_dash_is_not_special_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MailSourceError, match=r"^-: no such file or folder"):
        list(iter_messages(Path("-")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "locked.eml"
    path.write_bytes(b"Subject: x\n\nbody")
    path.chmod(0)
    with pytest.raises(MailSourceError, match=r"locked.eml: cannot read \(Permission denied\); check its"):
        list(iter_messages(path))


def test_read_error_inside_a_folder_names_the_file(tmp_path, monkeypatch):
    # Runs as root too (where chmod cannot make a file unreadable): the read itself fails.
    shutil.copy(DATA / "plain.eml", tmp_path / "bad.eml")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(MailSourceError, match=r"bad.eml: cannot read \(Permission denied\); check its"):
        list(iter_messages(tmp_path))


def test_not_a_file_or_folder(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(MailSourceError, match=r"pipe: not a regular file or folder"):
        list(iter_messages(fifo))
