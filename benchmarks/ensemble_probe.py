"""Does averaging K small models beat one? Trains K members on the same split, reports each member
and the average of their logit margins (temperature fitted on validation, thresholds by the card rule).

    python benchmarks/ensemble_probe.py default --members 3 --seed 123 lr=0.0005 max_tokens=256 steps=2600
"""

import argparse
import json
from dataclasses import asdict, replace

import numpy as np
import torch
from model_quality import EMAIL, SETUPS, SMS, data_options
from train_recipes import parse_overrides

from spamfilterd.classifier import encode_text
from spamfilterd.scores import Thresholds
from spamfilterd.tokenizer import get_tokenizer
from trainer.calibration import fit_temperature
from trainer.data import source_kind
from trainer.metrics import choose_thresholds, split_metrics
from trainer.train import RECIPES, EncodedSplit, TrainConfig, train, validation_margins


def margins_of(result, frame) -> np.ndarray:
    tokenizer = get_tokenizer()
    batches = EncodedSplit(
        [encode_text(tokenizer, text, result.max_tokens) for text in frame["Text"]],
        [int(label) for label in frame["Label"]],
    )
    return validation_margins(result.model, batches, torch.device("cpu"), "fp32")


def report(name, splits, val_margins, test_margins) -> dict:
    val_labels = splits.validation["Label"].astype(int).to_numpy()
    temperature = fit_temperature(val_margins, val_labels)
    val = 1 / (1 + np.exp(-val_margins / temperature))
    test = 1 / (1 + np.exp(-test_margins / temperature))
    thresholds = choose_thresholds(val_labels, val)
    line = {"name": name, "T": round(temperature, 3), "thresholds": asdict(thresholds)}
    kinds = np.array([source_kind(source) for source in splits.test["Source"]])
    labels = splits.test["Label"].astype(int).to_numpy()
    for kind in sorted(set(kinds)):
        rows = kinds == kind
        metrics = split_metrics(list(labels[rows]), list(test[rows]), thresholds)
        argmax = split_metrics(list(labels[rows]), list(test[rows]), Thresholds())
        line[kind] = {
            k: round(float(metrics[k]), 4) for k in ("accuracy", "fpr", "recall", "unsure_share", "ece")
        }
        line[kind]["argmax_acc"] = round(float(argmax["accuracy"]), 4)
    print(json.dumps(line), flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("setup", choices=SETUPS)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--mix-email", action="store_true")
    args = parser.parse_intermixed_args()
    torch.set_num_threads(2)
    splits, _ = __import__("trainer.data", fromlist=["build_splits"]).build_splits(
        data_options(args.setup, args.seed, args.mix_email, SMS, EMAIL)
    )
    base = TrainConfig(
        **{**RECIPES["random"], "seed": args.seed, "precision": "fp32", **parse_overrides(args.overrides)}
    )
    val_sum, test_sum = 0.0, 0.0
    for member in range(args.members):
        result = train(splits, replace(base, seed=args.seed + member), progress=False)
        val, test = margins_of(result, splits.validation), margins_of(result, splits.test)
        report(
            f"member {member} (epoch {result.history.best_epoch}, {result.train_seconds:.0f} s)",
            splits,
            val,
            test,
        )
        val_sum, test_sum = val_sum + val, test_sum + test
        if member:
            report(f"average of {member + 1}", splits, val_sum / (member + 1), test_sum / (member + 1))


if __name__ == "__main__":
    main()
