import subprocess
import sys
import textwrap

from spamfilterd.tokenizer import PAD_TOKEN_ID, VOCAB_SIZE, get_tokenizer


def test_reference_ids():
    tokenizer = get_tokenizer()
    assert tokenizer.encode("Do you have time") == [5211, 345, 423, 640]
    assert tokenizer.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [PAD_TOKEN_ID]
    assert PAD_TOKEN_ID == 50256
    assert tokenizer.n_vocab == VOCAB_SIZE == 50257


def test_round_trip_of_unicode_and_bytes():
    tokenizer = get_tokenizer()
    text = "Gewinne 1000 € jetzt! 📱 Call 0906-1701461 ÄÖÜ\n\ttabs"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_builds_with_networking_disabled(tmp_path):
    """A fresh interpreter whose sockets all fail still builds the exact encoding."""
    script = textwrap.dedent(
        """
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network disabled by test")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from spamfilterd.tokenizer import get_tokenizer
        print(get_tokenizer().encode("Do you have time"))
        """
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"),
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[5211, 345, 423, 640]"
