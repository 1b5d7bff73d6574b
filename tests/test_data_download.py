"""Getting the SMS corpus: `--data`, the user cache, or a verified download (from a local server)."""

import functools
import http.server
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from trainer.corpus import SMS_SHA256, cache_dir, cached_copy_path, locate_sms_corpus
from trainer.errors import DataError


@pytest.fixture
def served_zip(tmp_path, sms_corpus):
    """The corpus zipped like the UCI archive, on an HTTP server on 127.0.0.1 for this test only."""
    root = tmp_path / "www"
    root.mkdir()
    with zipfile.ZipFile(root / "sms.zip", "w") as archive:
        archive.writestr("readme", "SMS Spam Collection v.1")
        archive.writestr("SMSSpamCollection", sms_corpus.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/sms.zip"
    server.shutdown()
    server.server_close()


def test_download_is_checked_and_cached(tmp_path, served_zip, sms_corpus):
    cache = tmp_path / "cache"
    blob, origin = locate_sms_corpus(None, cache=cache, url=served_zip, progress=False)
    assert blob == sms_corpus.read_bytes()
    assert served_zip in origin
    assert cached_copy_path(cache).read_bytes() == blob
    # Second time: the cache answers, the (now wrong) URL is never asked.
    again, origin = locate_sms_corpus(None, cache=cache, url="http://127.0.0.1:9/none.zip", progress=False)
    assert again == blob and origin == str(cached_copy_path(cache))


def test_bad_hash_is_refused_and_nothing_is_cached(tmp_path, served_zip):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"sha256 .* expected 0000.*--data PATH"):
        locate_sms_corpus(None, cache=cache, url=served_zip, sha256="0" * 64, progress=False)
    assert not cached_copy_path(cache).exists()


def test_offline_without_a_copy_names_the_data_flag(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError, match=r"offline.*--data PATH"):
        locate_sms_corpus(None, cache=tmp_path, url=f"http://127.0.0.1:{port}/x.zip", progress=False)


def test_damaged_cache_is_downloaded_again(tmp_path, served_zip):
    cache = tmp_path / "cache"
    cached_copy_path(cache).parent.mkdir(parents=True)
    cached_copy_path(cache).write_text("ham\ttruncated")
    blob, _ = locate_sms_corpus(None, cache=cache, url=served_zip, progress=False)
    assert len(blob) == 477_907


def test_data_flag_wins(tmp_path, sms_corpus):
    blob, origin = locate_sms_corpus(sms_corpus, cache=tmp_path, url="http://127.0.0.1:9/", progress=False)
    assert origin == str(sms_corpus) and len(blob) == 477_907
    with pytest.raises(DataError, match="cannot read the SMS corpus"):
        locate_sms_corpus(tmp_path / "missing", cache=tmp_path)


def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "spamfilterd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "spamfilterd"


def test_published_hash_is_the_shared_copy(sms_corpus):
    import hashlib

    assert hashlib.sha256(sms_corpus.read_bytes()).hexdigest() == SMS_SHA256
