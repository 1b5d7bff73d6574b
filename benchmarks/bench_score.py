"""Messages/second of `SpamClassifier.score` for a GPT-2-small-sized classifier on this machine.

Random weights (the speed does not depend on them) with a widened class head so that P(spam)
spreads over (0, 1) and the precision modes' disagreement with fp32 is measurable. Prints a
Markdown table: mode, tokens, batch, msg/s, and the largest |P(spam) - P_fp32(spam)|.

    python benchmarks/bench_score.py [--preset gpt2-small] [--threads N] [--seconds 5] [--tokens 32,256]
"""

import argparse
import copy
import random
import time

import torch
from torch import nn

from spamfilterd.checkpoint import ModelCard
from spamfilterd.classifier import SpamClassifier
from spamfilterd.model import PRESETS, GPTModel, classifier_from
from spamfilterd.tokenizer import get_tokenizer


def make_texts(n: int, tokens: int, seed: int) -> list[str]:
    """Texts of at least `tokens` tokens; the classifier cuts each to exactly `tokens`."""
    rng = random.Random(seed)
    words = ["free", "call", "now", "prize", "meeting", "tomorrow", "lunch", "win", "txt", "ok"]
    return [" ".join(rng.choice(words) for _ in range(tokens + 8)) for _ in range(n)]


def build(preset: str, mode: str, tokens: int, batch: int, base: GPTModel) -> SpamClassifier:
    model = copy.deepcopy(base)
    precision = "bf16" if mode == "bf16" else "fp32"
    if mode == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    card = ModelCard(architecture=base.cfg.to_dict(), name=f"bench-{preset}", max_tokens=tokens)
    return SpamClassifier(model.eval(), card, torch.device("cpu"), precision, batch_size=batch)


def throughput(classifier: SpamClassifier, texts: list[str], seconds: float) -> float:
    classifier.score(texts[: classifier.batch_size])  # warm-up: allocations, oneDNN kernels
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        classifier.score(texts)
        done += len(texts)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(PRESETS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--modes", default="fp32,bf16,int8")
    parser.add_argument("--tokens", default="32,256", help="message lengths in tokens, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(123)
    base = classifier_from(GPTModel(PRESETS[args.preset])).eval()
    nn.init.normal_(base.out_head.weight, std=0.1)  # logits of a few units, like a trained head
    get_tokenizer()
    print(f"preset={args.preset} threads={args.threads} torch={torch.__version__}")
    print("| mode | tokens | batch | msg/s | max abs diff vs fp32 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for tokens in (int(n) for n in args.tokens.split(",")):
        texts = make_texts(64, tokens, seed=tokens)
        reference = build(args.preset, "fp32", tokens, 16, base).score(texts)
        for mode in args.modes.split(","):
            for batch in (1, 16):
                classifier = build(args.preset, mode, tokens, batch, base)
                diff = max(abs(a - b) for a, b in zip(classifier.score(texts), reference, strict=True))
                rate = throughput(classifier, texts[: max(batch, 16)], args.seconds)
                print(f"| {mode} | {tokens} | {batch} | {rate:.1f} | {diff:.4f} |", flush=True)


if __name__ == "__main__":
    main()
