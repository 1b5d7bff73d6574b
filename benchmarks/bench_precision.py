"""How far bf16 autocast moves a trained checkpoint's P(spam) from fp32, on a labelled corpus.

The speed table (bench_score.py) uses random weights; agreement has to be measured on a real
model, since a trained head's logits decide how much bf16 rounding shows in the probability.

    python benchmarks/bench_precision.py --model DIR \
        --data ../shared/data/sms_spam_collection/SMSSpamCollection
"""

import argparse
import csv
import time
from pathlib import Path

from spamfilterd.classifier import SpamClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="SMSSpamCollection (label<TAB>text)")
    parser.add_argument("--limit", type=int, default=2000)
    args = parser.parse_args()
    with open(args.data, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[: args.limit]
    texts = [text for _, text in rows]
    results = {}
    for precision in ("fp32", "bf16"):
        classifier = SpamClassifier.load(args.model, device="cpu", precision=precision)
        start = time.perf_counter()
        results[precision] = classifier.score(texts)
        rate = len(texts) / (time.perf_counter() - start)
        print(f"{precision}: {rate:.1f} msg/s over {len(texts)} messages")
    threshold = classifier.thresholds.spam
    diffs = [abs(a - b) for a, b in zip(results["fp32"], results["bf16"], strict=True)]
    flips = sum(
        (a >= threshold) != (b >= threshold) for a, b in zip(results["fp32"], results["bf16"], strict=True)
    )
    print(f"max |P_bf16 - P_fp32| = {max(diffs):.4f}; mean = {sum(diffs) / len(diffs):.5f}")
    print(f"verdicts that differ at the spam threshold {threshold:.4f}: {flips} of {len(texts)}")


if __name__ == "__main__":
    main()
