"""Clients of the spamd door: Debian's real `spamc`, the thin `spamfilterd classify`, and the
same messages through all three doors (spamd, SMTP, pipe) giving the same verdicts and headers.

The daemon side runs in this process on a background event loop with the tiny random
checkpoint; spamc and the thin client are real subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from spamfilterd.config import load_config
from spamfilterd.engine import GTUBE, FilterEngine
from spamfilterd.http import Metrics
from spamfilterd.pipe import classify
from spamfilterd.rules import Envelope
from spamfilterd.serve import build_runtime, smtp_proxy
from spamfilterd.spamc import SpamdClient
from spamfilterd.spamd import SpamdServer
from tests.helpers import LoopThread, Sink

REPO_ROOT = Path(__file__).resolve().parents[1]
SPAMC = shutil.which("spamc")
needs_spamc = pytest.mark.skipif(
    SPAMC is None, reason="Debian's spamc is not installed (apt-get install spamc; .ci/run installs it)"
)
# The random tiny model scores everything near 0.5: with these thresholds its verdict is ham, so
# GTUBE and the `listed` rule below are what make a message spam.
THRESHOLDS = {"spam": 0.99, "unsure": 0.98}
RULES = [
    {"name": "postmaster", "match": {"recipient_in": ["postmaster@*"]}, "actions": ["accept"]},
    {"name": "listed", "match": {"from_domain_in": ["spammer.example"]}, "actions": ["tag"]},
    {"name": "spam", "match": {"verdict": "spam"}, "actions": ["tag", {"subject-prefix": "[SPAM] "}]},
]


def mail(sender: str, subject: str, body: bytes, newline: bytes = b"\r\n") -> bytes:
    head = [
        f"From: {sender}",
        "To: bob@example.net",
        f"Subject: {subject}",
        f"Message-ID: <{subject}@test.example>",
        "X-Spam-Flag: NO",  # forged: must not survive
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
    ]
    return newline.join(line.encode() for line in head) + newline + newline + body


HAM_MAIL = mail("Alice <alice@example.org>", "lunch", "Grüße, see you at noon.\r\n".encode() * 40)
LISTED_MAIL = mail("Cheap <deals@spammer.example>", "deals", b"Buy now!\r\n" * 20)
GTUBE_MAIL = mail("Admin <admin@example.org>", "gtube", GTUBE + b"\r\n")
LF_MAIL = mail("Carol <carol@example.org>", "unix", b"plain LF lines\n" * 5, newline=b"\n")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_checkpoint):
    """The spamd door on a Unix socket and on TCP, plus the config file that points at it."""
    from spamfilterd.classifier import SpamClassifier

    work = tmp_path_factory.mktemp("spamd-clients")
    socket_path = work / "spamd.sock"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config_path = work / "config.yaml"
    data = {
        "model": {"checkpoint": str(tiny_checkpoint), "device": "cpu", "threads": 1},
        "thresholds": THRESHOLDS,
        "rules": RULES,
        "smtp": {"listen": None},
        "spamd": {"listen": [f"unix:{socket_path}", f"127.0.0.1:{port}"]},
    }
    config_path.write_text(yaml.safe_dump(data, allow_unicode=True))
    config = load_config(config_path)
    engine = FilterEngine(config, SpamClassifier.load(tiny_checkpoint, device="cpu", threads=1))
    metrics = Metrics()
    runtime = build_runtime(config, metrics, engine=engine)
    lt = LoopThread()
    server = SpamdServer(lambda: runtime, metrics)
    lt.run(server.start(config.spamd.listen, "0660"))
    yield {
        "config": config_path,
        "socket": socket_path,
        "port": port,
        "engine": engine,
        "lt": lt,
        "work": work,
    }
    lt.run(server.shutdown(2))
    lt.close()


def run(args: list[str], stdin: bytes, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, capture_output=True, cwd=cwd, timeout=timeout)


# --- Debian's spamc --------------------------------------------------------------------------


@needs_spamc
@pytest.mark.parametrize(
    ("message", "code", "score"), [(GTUBE_MAIL, 1, "10.0/5.0"), (LISTED_MAIL, 1, None), (HAM_MAIL, 0, None)]
)
def test_spamc_check_exit_codes(daemon, message, code, score):
    for where in (["-U", str(daemon["socket"])], ["-d", "127.0.0.1", "-p", str(daemon["port"])]):
        done = run([SPAMC, *where, "-c"], message, daemon["work"])
        assert done.returncode == code, done
        got, _, required = done.stdout.decode().strip().partition("/")
        assert required == "5.0"
        assert (float(got) >= 5.0) == (code == 1)
        if score:
            assert done.stdout.decode().strip() == score


@needs_spamc
@pytest.mark.parametrize("message", [HAM_MAIL, LISTED_MAIL, GTUBE_MAIL, LF_MAIL])
def test_plain_spamc_returns_our_headers_and_the_body_byte_identical(daemon, message):
    done = run([SPAMC, "-U", str(daemon["socket"])], message, daemon["work"])
    assert done.returncode == 0, done
    expected = daemon["engine"].check(message).message  # what the SMTP door delivers
    assert done.stdout == expected
    newline = b"\r\n" if b"\r\n" in message else b"\n"
    assert done.stdout.split(newline * 2, 1)[1] == message.split(newline * 2, 1)[1]
    assert done.stdout.count(b"X-Spam-Flag: ") == 1


@needs_spamc
def test_spamc_symbols_and_report(daemon):
    symbols = run([SPAMC, "-U", str(daemon["socket"]), "-y"], LISTED_MAIL, daemon["work"])
    assert symbols.stdout.decode().strip().startswith("VERDICT_HAM,RULE_LISTED,ACTION_TAG,MODEL_TINY_TEST")
    report = run([SPAMC, "-U", str(daemon["socket"]), "-R"], GTUBE_MAIL, daemon["work"])
    lines = report.stdout.decode().splitlines()
    assert lines[:2] == ["10.0/5.0", "spamfilterd verdict: spam (P(spam) 1.000, spam at 0.990 or above)"]
    assert "note: GTUBE test string found" in lines


@needs_spamc
def test_spamc_with_the_daemon_down_passes_the_message_through_unchanged(daemon, tmp_path):
    down = str(tmp_path / "nobody-listens.sock")
    done = run([SPAMC, "-U", down], HAM_MAIL, tmp_path)
    assert done.returncode == 0
    assert done.stdout == HAM_MAIL
    checked = run([SPAMC, "-U", down, "-c"], GTUBE_MAIL, tmp_path)
    assert (checked.returncode, checked.stdout) == (0, b"0/0\n")


# --- the thin client ------------------------------------------------------------------------


THIN = (
    "import sys\nfrom spamfilterd.cli import main\n"
    "try:\n    main(sys.argv[1:])\nfinally:\n"
    "    sys.stderr.write('torch imported\\n' if 'torch' in sys.modules else 'no torch\\n')\n"
)


def thin(daemon, args: list[str], stdin: bytes, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`spamfilterd classify` as a subprocess; stderr ends with whether torch was imported."""
    env = {k: v for k, v in os.environ.items() if k != "SPAMFILTERD_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", THIN, "classify", *args],
        input=stdin,
        capture_output=True,
        cwd=cwd or daemon["work"],
        env=env,
        timeout=120,
    )


def in_process(daemon, args: list[str], stdin: bytes):
    """The same command classifying in this process (`--model` keeps it off the daemon)."""
    model = str(load_config(daemon["config"]).model.checkpoint)
    return CliRunner().invoke(classify, [*args, "--model", model], input=stdin)


@pytest.mark.parametrize(
    "args",
    [
        ["-"],
        ["--format", "json", "-"],
        ["--format", "jsonl", "-"],
        ["--filter", "-"],
        ["--filter", "--recipient", "postmaster@example.net", "-"],
        ["--sender", "x@y.example", "--format", "json", "-"],
    ],
)
@pytest.mark.parametrize("message", [HAM_MAIL, LISTED_MAIL, GTUBE_MAIL])
def test_thin_client_output_and_exit_code_match_in_process_without_torch(daemon, args, message):
    args = ["--config", str(daemon["config"]), *args]
    remote = thin(daemon, args, message)
    local = in_process(daemon, args, message)
    assert remote.stderr.decode() == "no torch\n"
    assert remote.returncode == local.exit_code
    assert remote.stdout == local.stdout_bytes


def test_thin_client_reads_files_and_mailboxes_too(daemon, tmp_path):
    (tmp_path / "a.eml").write_bytes(HAM_MAIL)
    (tmp_path / "b.eml").write_bytes(GTUBE_MAIL)
    args = ["--config", str(daemon["config"]), str(tmp_path / "a.eml"), str(tmp_path / "b.eml")]
    remote = thin(daemon, args, b"")
    local = in_process(daemon, args, b"")
    assert remote.stderr.decode() == "no torch\n"
    assert (remote.returncode, remote.stdout) == (local.exit_code, local.stdout_bytes)
    verdicts = [json.loads(line)["verdict"] for line in remote.stdout.decode().splitlines()]
    assert verdicts == ["ham", "spam"]


def test_thin_client_daemon_option_needs_no_config(daemon, tmp_path):
    remote = thin(daemon, ["--daemon", f"127.0.0.1:{daemon['port']}", "-"], GTUBE_MAIL, cwd=tmp_path)
    assert remote.returncode == 0  # spam
    assert remote.stdout == b"spam 1.000 rule=spam actions=tag,subject-prefix\n"  # the daemon's rules
    assert remote.stderr.decode() == "no torch\n"


def test_thin_client_falls_back_in_process_and_says_so(daemon, tmp_path):
    down = f"unix:{tmp_path / 'down.sock'}"
    args = ["--config", str(daemon["config"]), "--daemon", down, "-"]
    fallback = thin(daemon, args, GTUBE_MAIL)
    assert fallback.returncode == 0
    assert fallback.stdout.decode().startswith("spam 1.000 ")
    assert fallback.stderr.decode() == (
        f"spamfilterd: the daemon at {down} did not answer: No such file or directory;"
        " classifying in-process (slow)\ntorch imported\n"
    )


def test_no_fallback_exits_75_or_passes_the_message_unchanged(daemon, tmp_path):
    down = f"unix:{tmp_path / 'down.sock'}"
    plain = thin(daemon, ["--daemon", down, "--no-fallback", "-"], GTUBE_MAIL, cwd=tmp_path)
    assert plain.returncode == 75
    assert plain.stdout == b""
    assert "did not answer: No such file or directory" in plain.stderr.decode()
    assert plain.stderr.decode().endswith("no torch\n")
    filtered = thin(daemon, ["--daemon", down, "--no-fallback", "--filter", "-"], HAM_MAIL, cwd=tmp_path)
    assert (filtered.returncode, filtered.stdout) == (0, HAM_MAIL)
    assert "message passed on unchanged" in filtered.stderr.decode()


# --- one message, three doors -----------------------------------------------------------------


def test_spamd_smtp_and_pipe_doors_give_identical_verdicts_and_headers(daemon):
    """PROCESS with the envelope (rspamd-style From/Rcpt), SMTP relay, and `classify --filter`."""
    engine = daemon["engine"]
    lt = daemon["lt"]
    sink = Sink(lt).start()
    data = yaml.safe_load(daemon["config"].read_text())
    data["smtp"] = {"downstream": f"127.0.0.1:{sink.port}"}  # same model, thresholds and rules
    (daemon["work"] / "smtp.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    config = load_config(daemon["work"] / "smtp.yaml")
    proxy = smtp_proxy(build_runtime(config, Metrics(), engine=engine), Metrics(), hostname="proxy.test")
    _, smtp_port = lt.run(proxy.start("127.0.0.1", 0))
    client = SpamdClient(f"unix:{daemon['socket']}", 30)
    try:
        envelopes = [
            ("alice@example.org", ("bob@example.net",)),
            ("x@spammer.example", ("postmaster@example.net",)),
            ("", ("bob@example.net", "carol@example.net")),
        ]
        for message in (HAM_MAIL, LISTED_MAIL, GTUBE_MAIL):
            for sender, rcpts in envelopes:
                with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as conn:
                    assert conn.sendmail(sender, list(rcpts), message) == {}
                via_smtp = sink.received[-1].content
                spamd = client.check(message, Envelope(sender, rcpts))
                recipients = [arg for rcpt in rcpts for arg in ("--recipient", rcpt)]
                pipe_args = [
                    "--config",
                    str(daemon["config"]),
                    "--filter",
                    "--sender",
                    sender,
                    *recipients,
                    "-",
                ]
                via_pipe = in_process(daemon, pipe_args, message).stdout_bytes
                assert via_smtp == spamd.message == via_pipe, (sender, rcpts)
                flagged = message is not HAM_MAIL and not rcpts[0].startswith("postmaster@")
                assert via_smtp.startswith(b"X-Spam-Flag: YES" if flagged else b"X-Spam-Flag: NO")
    finally:
        lt.run(proxy.shutdown(grace=2))
        sink.stop()
