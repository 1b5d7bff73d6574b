"""The spamd door's speed as its clients see it: thin `spamfilterd classify -`, spamc, 8 spamc at once.

Starts `spamfilterd serve` with only the spamd door (a Unix socket in a temporary directory),
then measures on ~5 KB emails:
  * `spamfilterd classify -` (thin client): median wall time and peak RSS per run;
  * `spamc -U SOCKET`: median wall time per message (process start included, as an MDA sees it);
  * 8 `spamc` clients in parallel: messages per second.
Every client is a real process. Without --model it uses models/default if there is one, else a
random `gpt-micro` checkpoint (the default model's shape) and says so.

    python benchmarks/bench_spamd.py --runs 200 --data ../shared/data/spamassassin_2002
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "spamassassin_2002"
TIME = shutil.which("time") or "/usr/bin/time"  # GNU time: peak RSS of the client alone


def emails(data: Path, count: int, low: int = 4000, high: int = 6000) -> list[bytes]:
    """`count` messages of `low`..`high` bytes (about 5 KB), ham and spam, in a fixed order."""
    found = sorted(p for p in data.rglob("*") if p.is_file() and low <= p.stat().st_size <= high)
    if not found:
        sys.exit(f"no {low}-{high} byte messages under {data} (pass --data DIR)")
    return [found[i % len(found)].read_bytes() for i in range(count)]


def checkpoint(model: Path | None, work: Path) -> tuple[Path, str]:
    if model is not None:
        return model, f"model {model}"
    if (REPO / "models" / "default" / "model.json").is_file():
        return REPO / "models" / "default", "model models/default"
    # Made in a child process: a parent that imported torch would inflate every client's peak RSS
    # (a forked child's RSS before exec counts).
    script = (
        "import sys, torch\n"
        "from spamfilterd.checkpoint import save_checkpoint\n"
        "from spamfilterd.model import PRESETS, GPTModel, classifier_from\n"
        "torch.manual_seed(0)\n"
        "net = classifier_from(GPTModel(PRESETS['gpt-micro']))\n"
        "card = {'name': 'bench-random-gpt-micro', 'max_tokens': 256,"
        " 'thresholds': {'spam': 0.5, 'unsure': 0.3}}\n"
        "save_checkpoint(net, sys.argv[1], card)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(work / "gpt-micro")], check=True)
    return work / "gpt-micro", "random gpt-micro checkpoint, max_tokens 256 (no models/default found)"


def start_daemon(config: Path, sock: Path, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "spamfilterd.cli", "serve", "--config", str(config)],
        stderr=log.open("wb"),
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the daemon exited with {proc.returncode}; see {log}")
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
                probe.sendall(b"PING SPAMC/1.5\r\n\r\n")
                if probe.recv(64).startswith(b"SPAMD/1.5 0 PONG"):
                    return proc
        except OSError:
            time.sleep(0.2)
    sys.exit("the daemon did not answer PING within 300 s")


def timed(argv: list[str], stdin: bytes) -> tuple[float, int]:
    """Wall seconds and peak RSS (KB, measured by GNU time) of one client process."""
    with tempfile.TemporaryFile() as source, tempfile.NamedTemporaryFile("r") as rss:
        source.write(stdin)
        source.seek(0)
        started = time.perf_counter()
        done = subprocess.run(
            [TIME, "-f", "%M", "-o", rss.name, *argv],
            stdin=source,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wall = time.perf_counter() - started
        peak = int(rss.read().split()[-1])
    if done.stderr:
        sys.exit(f"{argv[0]} wrote to stderr (fell back? daemon down?): {done.stderr.decode()[:300]}")
    return wall, peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200, help="thin-client and sequential spamc runs")
    parser.add_argument("--parallel-messages", type=int, default=800, help="messages for the 8-client run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--model", type=Path, help="checkpoint [default: models/default, else random gpt-micro]"
    )
    args = parser.parse_args()
    spamc = shutil.which("spamc")
    spamfilterd = Path(sys.executable).with_name("spamfilterd")
    if spamc is None or not spamfilterd.exists():
        sys.exit("needs spamc (apt-get install spamc) and the spamfilterd command in this venv")
    # An installed package has its bytecode compiled; a source checkout may not (PYTHONDONTWRITEBYTECODE).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "spamfilterd")], check=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, model_note = checkpoint(args.model, work)
        sock = work / "spamd.sock"
        config = work / "config.yaml"
        data = {
            # One torch thread: on a small, shared box two threads that wait for each other
            # (OpenMP barriers) are many times slower than one (docs/deployment.md, "spamd protocol").
            "model": {"checkpoint": str(model), "device": "cpu", "threads": 1},
            "smtp": {"listen": None},
            "spamd": {"listen": [f"unix:{sock}"]},
            "logging": {"level": "warning"},
        }
        config.write_text(yaml.safe_dump(data))
        messages = emails(args.data, max(args.runs, args.parallel_messages))
        sizes = [len(m) for m in messages]
        daemon = start_daemon(config, sock, work / "daemon.log")
        try:
            thin = [
                timed([str(spamfilterd), "classify", "--config", str(config), "-"], m)
                for m in messages[: args.runs]
            ]
            single = [timed([spamc, "-U", str(sock)], m)[0] for m in messages[: args.runs]]

            def one(message: bytes) -> None:
                timed([spamc, "-U", str(sock)], message)

            batch = messages[: args.parallel_messages]
            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(one, batch))
            parallel = len(batch) / (time.perf_counter() - started)
        finally:
            daemon.terminate()
            daemon.wait(60)

    print(f"# {model_note}; {args.runs} runs; emails {min(sizes)}-{max(sizes)} bytes")
    print(f"# {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    wall = statistics.median(w for w, _ in thin) * 1000
    peak = max(r for _, r in thin) / 1024
    print("| measurement | result | target |")
    print("| --- | ---: | ---: |")
    print(f"| thin `spamfilterd classify -`, median wall | {wall:.1f} ms | ≤ 100 ms |")
    print(f"| thin `spamfilterd classify -`, peak RSS (max of runs) | {peak:.1f} MB | ≤ 60 MB |")
    print(f"| `spamc`, median wall per message | {statistics.median(single) * 1000:.1f} ms | ≤ 20 ms |")
    print(f"| {args.clients} parallel `spamc` clients, throughput | {parallel:.0f} msg/s | ≥ 100 msg/s |")


if __name__ == "__main__":
    main()
