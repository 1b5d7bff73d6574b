"""Read raw messages from the places users keep mail: a file, an mbox, a maildir or a folder.

Shared by `spamfilterd classify` and `spamfilterd-train --ham/--spam`, so both see the same
messages under the same names. Messages are yielded one at a time: a large mbox is never loaded
whole.
"""

from __future__ import annotations

import mailbox
import os
from collections.abc import Iterator
from pathlib import Path

from spamfilterd.message import is_mbox_from_line

_WHAT_TO_PASS = "pass a message file, an mbox file, a maildir or a folder of message files"


class MailSourceError(Exception):
    """A mail path that cannot be read; the message names the path and what to do."""


def iter_messages(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (name, raw bytes) for every message under `path`.

    * a file whose first line is an mbox `From_` line (sender and date, e.g. "From alice@example.org
      Thu Nov 26 10:00:00 2026") is an mbox: names are "PATH#N" (N from 1); a text that merely
      starts with "From " is one message;
    * any other file is one message: its name is the path;
    * a maildir (a folder with cur/ and new/) yields each file of new/ then cur/ as one message,
      skipping tmp/ (deliveries in progress) and dotfiles: names are the file paths;
    * any other folder yields every regular file below it, recursively, sorted, skipping dotfiles
      and dot-folders; files in it are read by the rules above (mbox files, nested maildirs).
    """
    path = Path(path)
    if path.is_dir():
        yield from _iter_folder(path)
    elif path.is_file():
        yield from _iter_file(path)
    elif path.exists():
        raise MailSourceError(f"{path}: not a regular file or folder; {_WHAT_TO_PASS}")
    else:
        raise MailSourceError(f"{path}: no such file or folder; {_WHAT_TO_PASS}")


def _iter_file(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with path.open("rb") as handle:
            is_mbox = is_mbox_from_line(handle.readline(1000))
        box = mailbox.mbox(path, create=False) if is_mbox else None
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    if box is None:
        yield _read_one(path)
        return
    try:
        for number, key in enumerate(box.iterkeys(), start=1):
            yield f"{path}#{number}", box.get_bytes(key)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    finally:
        box.close()


def _iter_folder(path: Path) -> Iterator[tuple[str, bytes]]:
    if (path / "cur").is_dir() and (path / "new").is_dir():
        # Read the files directly rather than through mailbox.Maildir: exact bytes, real file
        # names, and no need for write access or a tmp/ folder.
        for sub in ("new", "cur"):
            for entry in _sorted_entries(path / sub):
                if entry.is_file():
                    yield _read_one(Path(entry.path))
        return
    for entry in _sorted_entries(path):
        if entry.is_dir(follow_symlinks=False):
            yield from _iter_folder(Path(entry.path))
        elif entry.is_file():
            yield from _iter_file(Path(entry.path))


def _read_one(path: Path) -> tuple[str, bytes]:
    try:
        return str(path), path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def _sorted_entries(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: OSError) -> MailSourceError:
    reason = exc.strerror or type(exc).__name__
    return MailSourceError(f"{path}: cannot read ({reason}); check its permissions or leave it out")
