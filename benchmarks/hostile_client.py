"""Issue 9's hostile-client checks against a real `spamfilterd serve` process, on 127.0.0.1 only.

Starts a recording downstream (aiosmtpd, in this process) and the daemon (a subprocess, with the
shipped config.yaml's rules and a random tiny model unless --model is given), then runs:

  rss      one DATA line of --mib MiB with no line end, sent in 64 KiB writes; the daemon's
           VmRSS before and after, and its peak (VmHWM)
  message  one well-formed message of --mib MiB; the daemon's peak RSS growth per message byte
  gtube    GTUBE to bob + carol + postmaster: what each recipient receives
  smuggle  `<LF>.<LF>` and `<LF>.<CR><LF>` smuggling payloads: what downstream receives

    nice -n 19 .venv/bin/python benchmarks/hostile_client.py rss --mib 1024
    nice -n 19 .venv/bin/python benchmarks/hostile_client.py gtube smuggle
    nice -n 19 .venv/bin/python benchmarks/hostile_client.py message --mib 64
    nice -n 19 .venv/bin/python benchmarks/hostile_client.py rss --repo ../main   # another tree

rss and gtube/smuggle use the shipped limits; message raises smtp.max_message_size to fit.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from aiosmtpd.controller import Controller

REPO = Path(__file__).resolve().parents[1]
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class Recorder:
    """The downstream MTA: keeps every message it accepts."""

    def __init__(self) -> None:
        self.received: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.received.append((list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 Ok: queued"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def reset_peak(pid: int) -> None:
    """Make VmHWM start from the current RSS (Linux: clear_refs 5), so start-up does not count."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def tiny_model(directory: Path) -> Path:
    import torch

    from spamfilterd.checkpoint import save_checkpoint
    from spamfilterd.model import PRESETS, GPTModel, classifier_from

    torch.manual_seed(0)
    card = {"name": "bench-tiny", "max_tokens": 64, "thresholds": {"spam": 0.5, "unsure": 0.3}}
    return save_checkpoint(classifier_from(GPTModel(PRESETS["gpt-tiny"])), directory, card)


class Client:
    """A raw SMTP client: what it sends is exactly what the test says, nothing fixed up."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.reader = self.sock.makefile("rb")
        self.reply()
        self.sock.sendall(b"EHLO hostile.test\r\n")
        self.reply()

    def reply(self) -> str:
        lines = []
        while True:
            line = self.reader.readline().decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if line[3:4] != "-":
                return " | ".join(lines)

    def command(self, line: bytes) -> str:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def transaction(self, rcpts: list[str]) -> None:
        assert self.command(b"MAIL FROM:<spammer@example.org>").startswith("250")
        for rcpt in rcpts:
            assert self.command(f"RCPT TO:<{rcpt}>".encode()).startswith("250"), rcpt
        assert self.command(b"DATA").startswith("354")

    def close(self) -> None:
        self.sock.close()


def run_rss(port: int, pid: int, mib: int) -> None:
    client = Client(port)
    client.transaction(["bob@example.net"])
    reset_peak(pid)
    before = memory_kib(pid)
    chunk = b"A" * 65536
    started = time.monotonic()
    for _ in range(mib * 16):
        client.sock.sendall(chunk)
    after_send = memory_kib(pid)
    client.sock.sendall(b"\r\n.\r\n")
    reply = client.reply()
    seconds = time.monotonic() - started
    after = memory_kib(pid)
    client.close()
    print(f"rss: {mib} MiB on one line in {seconds:.1f} s; reply {reply!r}")
    sent = after_send["VmRSS"] / 1024
    print(f"  daemon VmRSS before {before['VmRSS'] / 1024:.0f} MiB, all sent {sent:.0f} MiB,")
    print(f"  after the reply {after['VmRSS'] / 1024:.0f} MiB; peak (VmHWM) {after['VmHWM'] / 1024:.0f} MiB")


def run_message(port: int, pid: int, mib: int) -> None:
    body = (b"x" * 78 + b"\r\n") * (mib * 1024 * 1024 // 80)
    message = b"From: a@example.org\r\nSubject: big\r\n\r\n" + body
    client = Client(port)
    client.transaction(["bob@example.net"])
    reset_peak(pid)
    before = memory_kib(pid)
    client.sock.sendall(message + b".\r\n")
    reply = client.reply()
    client.close()
    peak = memory_kib(pid)["VmHWM"] - before["VmRSS"]
    print(f"message: {len(message) / 2**20:.0f} MiB, reply {reply!r}")
    print(f"  daemon peak RSS growth {peak / 1024:.0f} MiB = {peak * 1024 / len(message):.2f} x the message")


def run_gtube(port: int, recorder: Recorder) -> None:
    start = len(recorder.received)
    client = Client(port)
    client.transaction(["bob@example.net", "carol@example.net", "postmaster@example.net"])
    message = b"From: a@example.org\r\nSubject: test\r\n\r\n" + GTUBE + b"\r\n"
    client.sock.sendall(message + b".\r\n")
    print(f"gtube to bob, carol, postmaster: reply {client.reply()!r}")
    client.close()
    for rcpts, content in recorder.received[start:]:
        flag = re.search(rb"X-Spam-Flag: (\w+)", content)
        subject = re.search(rb"Subject: ([^\r\n]*)", content)
        status = re.search(rb"X-Spam-Status: ([^\r\n]*)", content)
        subject_text = subject and subject[1].decode()
        print(f"  to {rcpts}: X-Spam-Flag {flag and flag[1].decode()}, Subject {subject_text!r}")
        print(f"    X-Spam-Status: {status and status[1].decode()}")


SMUGGLING = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
}


def run_smuggle(port: int, recorder: Recorder) -> None:
    for name, end in SMUGGLING.items():
        start = len(recorder.received)
        client = Client(port)
        client.transaction(["bob@example.net"])
        payload = (
            b"From: a@example.org\r\nSubject: harmless\r\n\r\nhello"
            + end
            + b"MAIL FROM:<admin@example.net>\r\n"
            b"RCPT TO:<victim@example.net>\r\nDATA\r\nFrom: admin@example.net\r\nSubject: smuggled\r\n\r\n"
            + GTUBE
            + b"\r\n.\r\n"
        )
        client.sock.sendall(payload)
        reply = client.reply()
        client.close()
        count = len(recorder.received) - start
        print(f"smuggle {name}: reply {reply!r}; downstream received {count} message(s)")
        for rcpts, content in recorder.received[start:]:
            body = content.partition(b"\r\n\r\n")[2]
            print(f"  to {rcpts}: body {body[:120]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checks", nargs="+", choices=["rss", "message", "gtube", "smuggle"])
    parser.add_argument("--mib", type=int, default=256, help="payload size for rss and message")
    parser.add_argument("--model", type=Path, help="checkpoint (default: a random tiny one)")
    parser.add_argument("--repo", type=Path, default=REPO, help="source tree the daemon runs from")
    args = parser.parse_args()

    recorder = Recorder()
    sink = Controller(recorder, hostname="127.0.0.1", port=free_port(), data_size_limit=None)
    sink.start()
    work = Path(tempfile.mkdtemp(prefix="hostile-"))
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["model"] = {
        "checkpoint": str(args.model or tiny_model(work / "model")),
        "device": "cpu",
        "threads": 1,
    }
    config["thresholds"] = {"spam": 0.5, "unsure": 0.3}
    port = free_port()
    config["smtp"].update(listen=f"127.0.0.1:{port}", downstream=f"127.0.0.1:{sink.port}")
    if not (args.repo / "spamfilterd" / "config.py").read_text().count("max_bytes_in_flight"):
        del config["smtp"]["max_bytes_in_flight"]  # an older tree does not know the key
    if "message" in args.checks:  # else the shipped limits: rss shows they hold
        config["smtp"]["max_message_size"] = (args.mib + 8) << 20
        if "max_bytes_in_flight" in config["smtp"]:
            config["smtp"]["max_bytes_in_flight"] = config["smtp"]["max_message_size"]
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(args.repo.resolve())}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "spamfilterd.cli", "serve", "--config", str(work / "config.yaml")],
        env=env,
        cwd=args.repo,  # `python -m` puts the working directory first on sys.path
        stderr=(work / "daemon.log").open("wb"),
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the daemon did not start; see {work / 'daemon.log'}")
                time.sleep(0.5)
        print(f"daemon pid {daemon.pid} from {args.repo.resolve()}, log {work / 'daemon.log'}")
        print(f"smtp.max_message_size {config['smtp']['max_message_size']}")
        for check in args.checks:
            if check == "rss":
                run_rss(port, daemon.pid, args.mib)
            elif check == "message":
                run_message(port, daemon.pid, args.mib)
            elif check == "gtube":
                run_gtube(port, recorder)
            else:
                run_smuggle(port, recorder)
    finally:
        daemon.terminate()
        daemon.wait(60)
        sink.stop()


if __name__ == "__main__":
    main()
