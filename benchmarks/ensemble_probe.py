"""Does averaging K models beat one? Trains the K members `--members K` would train, one at a time,
on each seed's split, and reports every member alone and the averages of the first 2 … K members:
logit margins averaged, one temperature fitted on validation, thresholds by the card's rule on
validation (`--per-source`: counted for SMS and email apart, a variant round 7 rejected). Test
numbers per source; the last lines are the means over the seeds.

    python benchmarks/ensemble_probe.py default --members 3 --seeds 123,7,42 [key=value …]
"""

import argparse
import json
from dataclasses import replace

import numpy as np
import torch
from model_quality import EMAIL, SETUPS, SMS, data_options
from train_recipes import parse_overrides

from spamfilterd.classifier import encode_text
from spamfilterd.scores import Thresholds
from spamfilterd.tokenizer import get_tokenizer
from trainer.calibration import fit_temperature
from trainer.data import Splits, build_splits, source_kind
from trainer.metrics import choose_thresholds, split_metrics
from trainer.train import RECIPES, EncodedSplit, TrainConfig, member_seeds, train, validation_margins

KEYS = ("accuracy", "fpr", "recall", "unsure_share", "ece")


def margins_of(result, frame) -> np.ndarray:
    tokenizer = get_tokenizer()
    batches = EncodedSplit(
        [encode_text(tokenizer, text, result.max_tokens) for text in frame["Text"]],
        [int(label) for label in frame["Label"]],
    )
    return validation_margins(result.model, batches, torch.device("cpu"), "fp32")


def _kinds(frame) -> np.ndarray:
    return np.array([source_kind(source) for source in frame["Source"]])


def report(splits: Splits, val_margins: np.ndarray, test_margins: np.ndarray, per_source: bool) -> dict:
    val_labels = splits.validation["Label"].astype(int).to_numpy()
    test_labels = splits.test["Label"].astype(int).to_numpy()
    temperature = fit_temperature(val_margins, val_labels)
    val = 1 / (1 + np.exp(-val_margins / temperature))
    test = 1 / (1 + np.exp(-test_margins / temperature))
    val_kinds, test_kinds = _kinds(splits.validation), _kinds(splits.test)
    shared = choose_thresholds(list(val_labels), list(val))
    line: dict = {"T": round(temperature, 3)}
    for kind in sorted(set(test_kinds)):
        own = val_kinds == kind
        thresholds = choose_thresholds(list(val_labels[own]), list(val[own])) if per_source else shared
        rows = test_kinds == kind
        metrics = split_metrics(list(test_labels[rows]), list(test[rows]), thresholds)
        argmax = split_metrics(list(test_labels[rows]), list(test[rows]), Thresholds())
        line[kind] = {key: round(float(metrics[key]), 5) for key in KEYS}
        line[kind]["argmax_accuracy"] = round(float(argmax["accuracy"]), 5)
        line[kind]["spam_threshold"] = thresholds.spam
    return line


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("setup", choices=SETUPS)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--seeds", default="123")
    parser.add_argument("--per-source", action="store_true")
    args = parser.parse_intermixed_args()
    torch.set_num_threads(2)
    lines: dict[str, list[dict]] = {}
    for seed in [int(value) for value in args.seeds.split(",")]:
        splits, _ = build_splits(data_options(args.setup, seed, False, SMS, EMAIL))
        config = TrainConfig(
            **{**RECIPES["random"], "seed": seed, "precision": "fp32", **parse_overrides(args.overrides)}
        )
        val_sum, test_sum = np.zeros(len(splits.validation)), np.zeros(len(splits.test))
        for number, member_seed in enumerate(member_seeds(replace(config, members=args.members))):
            result = train(splits, replace(config, seed=member_seed, members=1), progress=False)
            val, test = margins_of(result, splits.validation), margins_of(result, splits.test)
            val_sum, test_sum = val_sum + val, test_sum + test
            named = {f"member {number + 1}": (val, test)}
            if number:
                named[f"average of {number + 1}"] = (val_sum / (number + 1), test_sum / (number + 1))
            for name, (val_margins, test_margins) in named.items():
                metrics = report(splits, val_margins, test_margins, args.per_source)
                line = {"seed": seed, "name": name, **metrics}
                if name.startswith("member"):
                    line.update(epoch=result.member_epochs[0], train_s=round(result.train_seconds, 1))
                lines.setdefault(name, []).append(line)
                print(json.dumps(line), flush=True)
    for name, rows in lines.items():
        for kind in [key for key in rows[0] if isinstance(rows[0][key], dict)]:
            means = {key: round(float(np.mean([row[kind][key] for row in rows])), 5) for key in KEYS}
            print(json.dumps({"mean over seeds": name, "source": kind, **means}))


if __name__ == "__main__":
    main()
