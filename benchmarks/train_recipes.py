"""Measure a training recipe on the reference split: test/val accuracy at 0.5 and the training time.

    python benchmarks/train_recipes.py --threads 2 epochs=10 lr=1e-3 dropout=0.1 ...

Each `key=value` overrides a field of trainer.train.TrainConfig on top of the `random` recipe
(or `--recipe reference`). Prints one JSON line; append it to a results file with `--log FILE`.
"""

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

import torch

from trainer.data import DataOptions, build_splits
from trainer.metrics import classification_metrics
from trainer.pipeline import score_splits
from trainer.train import RECIPES, TrainConfig, train

SPLITS = (("val", "validation"), ("test", "test"))
SMS = Path(__file__).resolve().parents[2] / "shared/data/sms_spam_collection/SMSSpamCollection"


def parse_overrides(pairs: list[str]) -> dict:
    types = {field.name: field.type for field in fields(TrainConfig)}
    overrides = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        kind = types[key]
        if value == "None":
            overrides[key] = None
        elif kind in (int, "int", int | None, "int | None"):
            overrides[key] = int(value)
        elif kind in (float, "float"):
            overrides[key] = float(value)
        else:
            overrides[key] = value
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--recipe", default="random", choices=sorted(RECIPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log", type=Path)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--device", default="cpu", help="cuda for quick recipe sweeps (fp32 by default)")
    parser.add_argument("--data", type=Path, default=SMS)
    parser.add_argument("--tag", default="", help="free text copied into the result line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.overrides)
    config = TrainConfig(**{**RECIPES[args.recipe], "device": args.device, "precision": "fp32", **overrides})
    splits, _ = build_splits(DataOptions(data=args.data))
    result = train(splits, config, progress=args.progress)
    started = time.perf_counter()
    scored = score_splits(result, splits)
    accuracy = {name: classification_metrics(*scored[split])["accuracy"] for name, split in SPLITS}
    line = {
        "tag": args.tag,
        "recipe": args.recipe,
        "overrides": overrides,
        "test_acc": round(accuracy["test"], 4),
        "val_acc": round(accuracy["val"], 4),
        "train_s": round(result.train_seconds, 1),
        "score_s": round(time.perf_counter() - started, 1),
        "threads": args.threads,
        "device": result.device,
        "final_val_epoch_acc": result.history.val_accuracy,
    }
    print(json.dumps(line))
    if args.log:
        with args.log.open("a") as handle:
            handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
