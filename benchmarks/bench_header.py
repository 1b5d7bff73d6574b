"""Seconds to tag a message whose header has one field folded over many lines (issue 9, item 2).

Times `tagging.rewrite_headers` (the header surgery done on every message, and on the
`unchecked` fallback) and `FilterEngine.check` with a constant-score stand-in for the model,
so the number is the filter's own work, not the network's. No model or torch needed.

    python benchmarks/bench_header.py [--lines 800000] [--repeat 3]
"""

import argparse
import time
from pathlib import Path

from spamfilterd.config import Config, ModelConfig
from spamfilterd.engine import FilterEngine
from spamfilterd.rules import Envelope
from spamfilterd.scores import Thresholds
from spamfilterd.tagging import rewrite_headers, status_headers


class ConstantClassifier:
    """Answers 0.1 for every text: stands in for the model, whose cost does not depend on headers."""

    model_id = "constant"
    thresholds = Thresholds()

    def score(self, texts: list[str]) -> list[float]:
        return [0.1] * len(texts)


def folded_message(lines: int) -> bytes:
    """A From/To/Subject message plus one `X-Junk` field folded over `lines` lines (4 bytes each)."""
    head = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hello\r\nX-Junk: x\r\n"
    return head + b" y\r\n" * lines + b"\r\nbody\r\n"


def best_of(repeat: int, work) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=800_000, help="continuation lines [800000]")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is reported [3]")
    args = parser.parse_args()
    raw = folded_message(args.lines)
    engine = FilterEngine(Config(model=ModelConfig(checkpoint=Path("unused"))), ConstantClassifier())
    headers = status_headers(engine.check(b"Subject: warm-up\r\n\r\nhi\r\n").decision, 0.5, "constant")
    rewrite = best_of(args.repeat, lambda: rewrite_headers(raw, headers))
    check = best_of(args.repeat, lambda: engine.check(raw, Envelope()))
    print(f"message: {len(raw):,} bytes, one field folded over {args.lines:,} lines")
    print(f"rewrite_headers: {rewrite:.3f} s   FilterEngine.check (constant model): {check:.3f} s")


if __name__ == "__main__":
    main()
