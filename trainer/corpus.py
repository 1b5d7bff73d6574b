"""Finding the SMS Spam Collection: `--data`, else the user cache, else a verified download.

The file is small and public, but mail servers are often offline, so the order lets an admin copy
it in by hand; a download is checked against the published sha256 before it is cached.
"""

import hashlib
import io
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from trainer.errors import DataError

SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_FILE = "SMSSpamCollection"
SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
DOWNLOAD_TIMEOUT_S = 60


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/spamfilterd` (default `~/.cache/spamfilterd`), as other Linux tools do."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spamfilterd"


def cached_copy_path(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "sms_spam_collection" / SMS_FILE


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_sms_bytes(path: Path) -> bytes:
    """The raw corpus from a `SMSSpamCollection` file, a folder holding it, or the UCI zip."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / SMS_FILE
    try:
        if zipfile.is_zipfile(path):
            return _extract_from_zip(path.read_bytes(), str(path))
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the SMS corpus ({exc.strerror or exc})") from exc


def _extract_from_zip(blob: bytes, origin: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        names = [name for name in archive.namelist() if Path(name).name == SMS_FILE]
        if not names:
            raise DataError(f"{origin}: the zip has no {SMS_FILE} file in it")
        return archive.read(names[0])


def locate_sms_corpus(
    data: Path | None,
    cache: Path | None = None,
    url: str = SMS_URL,
    sha256: str = SMS_SHA256,
    progress: bool = True,
) -> tuple[bytes, str]:
    """(corpus bytes, where they came from) following the order `--data` → cache → download."""
    if data is not None:
        return read_sms_bytes(data), str(Path(data).expanduser())
    cached = cached_copy_path(cache)
    if cached.is_file():
        blob = cached.read_bytes()
        if sha256_of(blob) == sha256:
            return blob, str(cached)
        cached.unlink()  # a damaged cache entry is worth one fresh download, not an error
    blob = download_sms_corpus(url, sha256, progress)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".part")
    partial.write_bytes(blob)
    partial.replace(cached)
    return blob, f"{url} (cached at {cached})"


def download_sms_corpus(url: str = SMS_URL, sha256: str = SMS_SHA256, progress: bool = True) -> bytes:
    """Fetch the UCI zip, extract the corpus and refuse it unless its sha256 is the published one."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            chunks = []
            with tqdm(
                total=total, unit="B", unit_scale=True, desc="SMS Spam Collection", disable=not progress
            ) as bar:
                while chunk := response.read(1 << 16):
                    chunks.append(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DataError(
            f"cannot download the SMS Spam Collection from {url} ({exc}); if this machine is offline, "
            f"copy the file `{SMS_FILE}` (or the UCI zip) here and pass it with --data PATH"
        ) from exc
    blob = b"".join(chunks)
    corpus = _extract_from_zip(blob, url) if zipfile.is_zipfile(io.BytesIO(blob)) else blob
    actual = sha256_of(corpus)
    if actual != sha256:
        raise DataError(
            f"{url}: downloaded {SMS_FILE} has sha256 {actual}, expected {sha256} (damaged or changed "
            f"upstream); get a good copy and pass it with --data PATH"
        )
    return corpus
