"""The spamd door on loopback and on a Unix socket: aiospamc (an independent client) and raw sockets.

The server runs on an event loop in a background thread, as in the daemon, with a real tiny
random checkpoint; verdicts are forced with config thresholds (see tests/test_smtp.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiospamc
import pytest
import yaml
from aiospamc.connections import Timeout
from aiospamc.responses import UnavailableException

from spamfilterd.batcher import Runtime
from spamfilterd.config import ConfigError, load_config
from spamfilterd.engine import GTUBE, FilterEngine
from spamfilterd.http import Metrics
from spamfilterd.serve import build_runtime
from spamfilterd.spamd import SpamdServer, peer_allowed
from spamfilterd.spamd_protocol import REQUIRED_SCORE, spamd_score
from tests.helpers import HAM, SPAM, LoopThread, count_header_reads, make_message, reads_of, split

TIMEOUT = Timeout(total=30)


@dataclass
class Door:
    lt: LoopThread
    server: SpamdServer
    port: int
    socket_path: Path
    runtime: Runtime
    metrics: Metrics

    def raw(self, data: bytes, half_close: bool = True, unix: bool = False) -> bytes:
        """Send `data`, then read the whole answer (the server closes after one request)."""
        if unix:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(self.socket_path))
        else:
            sock = socket.create_connection(("127.0.0.1", self.port))
        with sock:
            sock.settimeout(30)
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            return b"".join(iter(lambda: sock.recv(65536), b""))

    def ask(self, function, *args, **kwargs):
        """One aiospamc call against the TCP door."""
        return asyncio.run(function(*args, host="127.0.0.1", port=self.port, timeout=TIMEOUT, **kwargs))


def make_door(lt, classifier, tmp_path, thresholds=HAM, rules=(), spamd=None, smtp=None) -> Door:
    data = {
        "model": {"checkpoint": str(tmp_path.parent / "checkpoint"), "device": "cpu", "batch_size": 8},
        "thresholds": thresholds,
        "rules": list(rules),
        "smtp": {"listen": None, **(smtp or {})},
        "spamd": {"listen": ["127.0.0.1:783"], **(spamd or {})},  # start() gets its own addresses
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    metrics = Metrics()
    runtime = build_runtime(config, metrics, engine=FilterEngine(config, classifier))
    server = SpamdServer(lambda: runtime, metrics)
    socket_path = tmp_path / "spamd.sock"
    bound = lt.run(server.start(("127.0.0.1:0", f"unix:{socket_path}"), "0660"))
    return Door(lt, server, int(bound[0].rpartition(":")[2]), socket_path, runtime, metrics)


@pytest.fixture
def workdir(tmp_path, tiny_checkpoint):
    """tmp_path/work, with the tiny checkpoint beside it as tmp_path/checkpoint (make_door's path)."""
    (tmp_path / "checkpoint").symlink_to(tiny_checkpoint, target_is_directory=True)
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.fixture
def door(lt, classifier, workdir, request):
    """`@pytest.mark.parametrize('door', [{...}], indirect=True)` passes thresholds/rules/spamd."""
    made = make_door(lt, classifier, workdir, **dict(getattr(request, "param", {})))
    yield made
    lt.run(made.server.shutdown(2))


def status_line(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode()


def request(verb: str, message: bytes, version: str = "1.5", extra: str = "") -> bytes:
    head = f"{verb} SPAMC/{version}\r\nContent-length: {len(message)}\r\n{extra}\r\n"
    return head.encode() + message


# --- every request type ---------------------------------------------------------------------


@pytest.mark.parametrize("door", [{"thresholds": SPAM}], indirect=True)
def test_check_says_spam_with_a_score_at_or_above_the_threshold(door):
    response = door.ask(aiospamc.check, make_message("c1"))
    spam = response.headers.spam
    assert response.status_code == 0
    assert spam.value is True
    assert spam.threshold == REQUIRED_SCORE
    assert spam.score >= spam.threshold
    assert response.body == b""


@pytest.mark.parametrize("door", [{"thresholds": HAM}], indirect=True)
def test_check_says_ham_with_a_score_below_the_threshold(door):
    spam = door.ask(aiospamc.check, make_message("c2")).headers.spam
    assert spam.value is False
    assert spam.score < spam.threshold == REQUIRED_SCORE


@pytest.mark.parametrize("door", [{"thresholds": HAM}], indirect=True)
def test_gtube_is_spam_whatever_the_model_says_and_symbols_name_it(door):
    message = make_message("gtube", body=GTUBE + b"\r\n")
    response = door.ask(aiospamc.symbols, message)
    assert response.headers.spam.value is True
    assert response.headers.spam.score == 10.0
    symbols = response.body.decode().split(",")
    assert symbols[:3] == ["VERDICT_SPAM", "RULE_DEFAULT", "GTUBE"]
    assert "ACTION_TAG" in symbols
    assert symbols[-1].startswith("MODEL_TINY_TEST")


@pytest.mark.parametrize("door", [{"thresholds": SPAM}], indirect=True)
def test_report_and_report_ifspam_for_spam(door):
    report = door.ask(aiospamc.report, make_message("r1")).body.decode()
    assert report.startswith("spamfilterd verdict: spam (P(spam) ")
    assert "rule: default; actions: tag" in report
    ifspam = door.ask(aiospamc.report_if_spam, make_message("r2"))
    assert ifspam.headers.spam.value is True
    assert ifspam.body.decode().startswith("spamfilterd verdict: spam")


@pytest.mark.parametrize("door", [{"thresholds": HAM}], indirect=True)
def test_report_ifspam_is_empty_for_ham(door):
    response = door.ask(aiospamc.report_if_spam, make_message("r3"))
    assert response.headers.spam.value is False
    assert response.body == b""
    assert b"Spam: No ; " in door.raw(request("REPORT_IFSPAM", make_message("r4")))


@pytest.mark.parametrize("door", [{"thresholds": SPAM}], indirect=True)
def test_process_returns_our_headers_and_the_body_byte_identical(door):
    message = make_message("p1")
    tagged = door.ask(aiospamc.process, message).body
    head, body = split(tagged)
    assert body == split(message)[1]
    assert head.startswith(b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=")
    assert head.count(b"X-Spam-Flag") == 1  # the forged one is gone
    assert tagged == door.runtime.engine.check(message).message  # what the SMTP door writes


@pytest.mark.parametrize("door", [{"thresholds": HAM}], indirect=True)
def test_headers_returns_the_tagged_header_block_only(door):
    message = make_message("h1")
    head = door.ask(aiospamc.headers, message).body
    assert head == split(door.runtime.engine.check(message).message)[0] + b"\r\n"
    assert b"X-Spam-Flag: NO\r\n" in head


PASS_UNCHECKED = {"thresholds": SPAM, "smtp": {"on_classifier_error": "pass"}}


@pytest.mark.parametrize("door", [PASS_UNCHECKED], indirect=True)
def test_the_header_block_is_read_once_per_request(door, caplog, monkeypatch):
    """The door reads it (the logged Message-ID) and the engine uses that reading: text, rules,
    tagging, and the unchecked copy after a classifier failure."""
    caplog.set_level("INFO", logger="spamfilterd.spamd")
    reads = count_header_reads(monkeypatch)
    assert door.ask(aiospamc.check, make_message("once-check")).headers.spam.value is True
    assert door.ask(aiospamc.process, make_message("once-process")).body.startswith(b"X-Spam-Flag: YES")
    assert b"X-Spam-Flag: YES\r\n" in door.ask(aiospamc.headers, make_message("once-headers")).body

    def broken(texts):
        raise RuntimeError("out of memory")

    door.runtime.engine.classifier = type("Broken", (), {"score": staticmethod(broken)})()
    unchecked = door.ask(aiospamc.process, make_message("once-unchecked")).body
    assert b"X-Spam-Status: unchecked\r\n" in unchecked
    tags = ["once-check", "once-process", "once-headers", "once-unchecked"]
    assert [reads_of(reads, tag) for tag in tags] == [1, 1, 1, 1]
    logged = " ".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
    assert all(f"<{tag}@test.example>" in logged for tag in tags)


def test_ping_skip_and_tell(door):
    assert door.ask(aiospamc.ping).message == "PONG"
    assert door.raw(b"PING SPAMC/1.5\r\n\r\n", unix=True) == b"SPAMD/1.5 0 PONG\r\n"
    assert door.raw(b"SKIP SPAMC/1.5\r\n\r\n") == b""
    with pytest.raises(UnavailableException, match="TELL is not supported"):
        door.ask(aiospamc.tell, make_message("t1"), "spam", set_action="local").raise_for_status()


def test_protocol_1_2_answers_carry_only_the_spam_header_as_exim_parses_it(door):
    """Exim sends `REPORT SPAMC/1.2` and scans `SPAMD/%s 0 EX_OK\\r\\nSpam: %s ; %lf / %lf\\r\\n\\r\\n`."""
    answer = door.raw(request("REPORT", make_message("x1"), version="1.2"))
    first, spam, blank, report = answer.split(b"\r\n", 3)
    assert first == b"SPAMD/1.5 0 EX_OK"
    assert spam.startswith(b"Spam: False ; ") and spam.endswith(b" / 5.0")
    assert blank == b""
    assert report.startswith(b"spamfilterd verdict: ham")


def test_a_message_without_content_length_is_read_to_the_end(door):
    message = make_message("old")
    answer = door.raw(b"PROCESS SPAMC/1.1\r\n\r\n" + message)
    assert status_line(answer) == "SPAMD/1.5 0 EX_OK"
    assert answer.endswith(split(message)[1])


def test_zlib_compressed_requests_are_inflated(door):
    message = make_message("z1")
    body = zlib.compress(message)
    answer = door.raw(request("PROCESS", body, extra="Compress: zlib\r\n"))
    assert answer.endswith(split(message)[1])


# --- envelope and rules -------------------------------------------------------------------------


RULES = [
    {"name": "vip", "match": {"recipient_in": ["boss@example.net"]}, "actions": ["accept"]},
    {"name": "trusted", "match": {"sender_in": ["*@partner.example"]}, "actions": ["accept"]},
]


@pytest.mark.parametrize("door", [{"thresholds": SPAM, "rules": RULES}], indirect=True)
def test_user_and_rspamd_style_envelope_headers_reach_the_rules(door):
    message = make_message("env")
    by_user = door.ask(aiospamc.check, message, user="boss@example.net").headers.spam
    assert by_user.value is False and by_user.score < REQUIRED_SCORE  # accepted: not spam, S < R
    bare_user = door.ask(aiospamc.check, message, user="boss").headers.spam
    assert bare_user.value is True  # a Unix user name is no recipient address
    answer = door.raw(request("SYMBOLS", message, extra="From: <x@partner.example>\r\n"))
    assert b"Spam: False ; " in answer
    assert b"\r\n\r\nVERDICT_SPAM,RULE_TRUSTED,ACTION_ACCEPT,MODEL_TINY_TEST" in answer
    # Several recipients: the first one's decision (the SMTP proxy splits per recipient).
    answer = door.raw(request("CHECK", message, extra="Rcpt: boss@example.net, carol@example.net\r\n"))
    assert b"Spam: False ; " in answer
    answer = door.raw(
        request("CHECK", message, extra="Rcpt: carol@example.net\r\nRcpt: boss@example.net\r\n")
    )
    assert b"Spam: True ; " in answer


def test_score_mapping_puts_s_at_or_above_r_exactly_for_spam():
    for threshold in (0.0, 0.05, 0.3, 0.5, 0.77, 0.999, 1.0, 1.01):
        for step in range(0, 1001):
            p = step / 1000
            spam = p >= threshold
            score = spamd_score(p, threshold, spam)
            assert (score >= REQUIRED_SCORE) == spam, (threshold, p, score)
            assert 0.0 <= score <= 10.0
            assert spamd_score(p, threshold, not spam) >= REQUIRED_SCORE or spam  # rules can flip it
    assert spamd_score(0.5, 0.5, True) == 5.0
    assert spamd_score(1.0, 0.5, True) == 10.0
    assert spamd_score(0.4999, 0.5, False) == 4.9  # rounding never crosses R


# --- malformed and oversized requests, timeouts, limits ------------------------------------------


@pytest.mark.parametrize(
    ("data", "code", "text"),
    [
        (b"HELLO\r\n\r\n", 76, "bad request line"),
        (b"FROB SPAMC/1.5\r\n\r\n", 76, "unknown command"),
        (b"CHECK SPAMC/x.y\r\n\r\n", 76, "bad protocol version"),
        (b"CHECK SPAMC/1.5\r\nno colon here\r\n\r\n", 76, "bad header line"),
        (b"CHECK SPAMC/1.5\r\nContent-length: ten\r\n\r\n", 76, "bad Content-length"),
        (b"CHECK SPAMC/1.5\r\nContent-length: 100\r\n\r\nshort", 76, "shorter than its Content-length"),
        (b"CHECK SPAMC/1.5\r\n" + b"X: y\r\n" * 101 + b"\r\n", 76, "more than 100 header lines"),
        (b"CHECK SPAMC/1.5\r\nX: " + b"y" * 9000 + b"\r\n\r\n", 76, "longer than 8192 bytes"),
        (b"CHECK SPAMC/1.5\r\nCompress: lzma\r\nContent-length: 1\r\n\r\nx", 76, "unsupported Compress"),
        (b"CHECK SPAMC/1.5\r\nCompress: zlib\r\nContent-length: 3\r\n\r\nxyz", 76, "bad zlib data"),
        (b"CHECK SPAMC/1.5\r\nContent-length: 5", 76, "connection closed"),
    ],
)
def test_malformed_requests_get_ex_protocol_and_the_door_keeps_serving(door, data, code, text):
    answer = door.raw(data).decode()
    assert answer.startswith(f"SPAMD/1.5 {code} EX_PROTOCOL ")
    assert text in answer
    assert door.ask(aiospamc.ping).message == "PONG"


@pytest.mark.parametrize("door", [{"spamd": {"max_message_size": 1000}}], indirect=True)
def test_oversized_messages_get_ex_dataerr_before_and_after_reading(door):
    big = make_message("big", body=b"x" * 5000)
    declared = door.raw(request("PROCESS", big), half_close=False)  # answered without reading it
    assert status_line(declared).startswith("SPAMD/1.5 65 EX_DATAERR message of ")
    undeclared = door.raw(b"PROCESS SPAMC/1.1\r\n\r\n" + big)
    assert status_line(undeclared).startswith("SPAMD/1.5 65 EX_DATAERR message larger than")
    compressed = door.raw(request("CHECK", zlib.compress(big), extra="Compress: zlib\r\n"))
    assert status_line(compressed).startswith("SPAMD/1.5 65 EX_DATAERR")
    with pytest.raises(aiospamc.responses.DataErrorException):
        door.ask(aiospamc.check, big).raise_for_status()


@pytest.mark.parametrize("door", [{"spamd": {"read_timeout": 0.5}}], indirect=True)
def test_a_stalled_client_gets_ex_timeout(door):
    with socket.create_connection(("127.0.0.1", door.port)) as sock:
        sock.settimeout(10)
        sock.sendall(b"CHECK SPAMC/1.5\r\nContent-length: 100\r\n\r\nonly a bit")
        answer = sock.recv(4096).decode()
    assert answer.startswith("SPAMD/1.5 79 EX_TIMEOUT request not received within 0.5 s")


@pytest.mark.parametrize("door", [{"thresholds": SPAM}], indirect=True)
def test_concurrent_clients_all_get_their_own_answer_in_shared_batches(door):
    classifier = door.runtime.engine.classifier

    class Slow:  # each model call takes long enough for the other clients to queue up behind it
        def score(self, texts):
            time.sleep(0.2)
            return classifier.score(texts)

    door.runtime.engine.classifier = Slow()
    messages = [make_message(f"conc{i}") + f"unique {i}\r\n".encode() for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda m: door.ask(aiospamc.process, m).body, messages))
    for message, answer in zip(messages, answers, strict=True):
        assert split(answer)[1] == split(message)[1]
        assert answer.startswith(b"X-Spam-Flag: YES")
    assert door.metrics.batched_messages == 24
    assert door.metrics.batches < 24  # some requests shared a model call


@pytest.mark.parametrize("door", [{"spamd": {"max_connections": 2}}], indirect=True)
def test_connections_over_the_limit_get_ex_tempfail(door):
    held = [socket.create_connection(("127.0.0.1", door.port)) for _ in range(2)]
    try:
        deadline = time.monotonic() + 10
        while door.server.connections < 2 and time.monotonic() < deadline:  # both accepted
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", door.port)) as sock:  # answered before it asks
            sock.settimeout(10)
            answer = sock.recv(4096)
        assert status_line(answer) == "SPAMD/1.5 75 too many connections, try again later"
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while door.server.connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert door.ask(aiospamc.ping).message == "PONG"


def test_peers_outside_loopback_and_the_allowed_networks_are_refused():
    assert peer_allowed(("127.0.0.1", 5000), None)
    assert peer_allowed(("::1", 5000, 0, 0), None)
    assert peer_allowed(("::ffff:127.0.0.1", 5000, 0, 0), None)
    assert not peer_allowed(("192.0.2.7", 5000), None)
    assert peer_allowed(("192.0.2.7", 5000), ("192.0.2.0/24",))
    assert not peer_allowed(("198.51.100.1", 5000), ("192.0.2.0/24",))
    assert peer_allowed("", None)  # a Unix socket: its file mode decides


@pytest.mark.parametrize(
    ("spamd", "error"),
    [
        ({"listen": ["0.0.0.0:783"]}, "spamd.listen[0]: 0.0.0.0 is not a loopback address"),
        ({"listen": ["unix:relative.sock"]}, "spamd.listen[0]: expected an absolute path after unix:"),
        ({"listen": ["localhost"]}, "spamd.listen[0]: expected host:port"),
        ({"listen": ["127.0.0.1:783"], "allowed_networks": ["nonsense"]}, "spamd.allowed_networks[0]:"),
        (
            {"listen": ["127.0.0.1:783"], "socket_mode": 432},
            'spamd.socket_mode: expected an octal mode in quotes, e.g. "0660"',
        ),
        ({"listen": []}, "smtp.listen is null and spamd.listen is empty"),
    ],
)
def test_bad_spamd_config_names_the_key(tiny_checkpoint, tmp_path, spamd, error):
    path = tmp_path / "config.yaml"
    data = {"model": {"checkpoint": str(tiny_checkpoint)}, "smtp": {"listen": None}, "spamd": spamd}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_config(path)


def test_a_non_loopback_door_needs_allowed_networks(tiny_checkpoint, tmp_path):
    path = tmp_path / "config.yaml"
    spamd = {
        "listen": ["0.0.0.0:783", "unix:/run/spamfilterd/spamd.sock"],
        "allowed_networks": ["10.0.0.0/8"],
    }
    path.write_text(yaml.safe_dump({"model": {"checkpoint": str(tiny_checkpoint)}, "spamd": spamd}))
    config = load_config(path)
    assert config.spamd.listen == ("0.0.0.0:783", "unix:/run/spamfilterd/spamd.sock")
    assert config.spamd.allowed_networks == ("10.0.0.0/8",)


def test_unix_socket_gets_its_mode_and_a_stale_one_is_replaced(lt, classifier, workdir):
    first = make_door(lt, classifier, workdir)
    assert (first.socket_path.stat().st_mode & 0o777) == 0o660
    assert first.raw(b"PING SPAMC/1.5\r\n\r\n", unix=True) == b"SPAMD/1.5 0 PONG\r\n"
    with pytest.raises(OSError, match="another daemon is listening there"):
        lt.run(SpamdServer(lambda: first.runtime, Metrics()).start((f"unix:{first.socket_path}",), "0660"))
    lt.call(first.server._servers[1].close)  # as if the daemon had been killed: the socket file stays
    lt.run(first.server._servers[1].wait_closed())
    assert first.socket_path.exists()
    second = make_door(lt, classifier, workdir)
    assert second.raw(b"PING SPAMC/1.5\r\n\r\n", unix=True) == b"SPAMD/1.5 0 PONG\r\n"
    lt.run(first.server.shutdown(1))
    lt.run(second.server.shutdown(1))
    assert not second.socket_path.exists()


def test_thin_client_result_header_is_only_sent_on_request(door):
    plain = door.raw(request("CHECK", make_message("j0")))
    assert b"Spamfilterd-Result" not in plain
    answer = door.raw(request("CHECK", make_message("j1"), extra="Spamfilterd-Result: yes\r\n"))
    line = next(x for x in answer.split(b"\r\n") if x.startswith(b"Spamfilterd-Result: "))
    record = json.loads(line.partition(b": ")[2])
    assert (
        record["verdict"] == "ham" and record["rule"] == "default" and record["model"].startswith("tiny-test")
    )


@pytest.mark.parametrize(
    ("policy", "status"),
    [("pass", "SPAMD/1.5 0 EX_OK"), ("tempfail", "SPAMD/1.5 75 EX_TEMPFAIL spam filter unavailable")],
)
def test_classifier_failure_follows_on_classifier_error(lt, classifier, workdir, policy, status):
    made = make_door(lt, classifier, workdir, smtp={"on_classifier_error": policy})

    def broken(texts):
        raise RuntimeError("out of memory")

    made.runtime.engine.classifier = type("Broken", (), {"score": staticmethod(broken)})()
    try:
        answer = made.raw(request("PROCESS", make_message("broken")))
        assert status_line(answer) == status
        if policy == "pass":
            assert b"Spam: False ; 0.0 / 5.0" in answer
            assert b"X-Spam-Status: unchecked\r\n" in answer
    finally:
        lt.run(made.server.shutdown(1))
