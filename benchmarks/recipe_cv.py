"""Choose between recipes on out-of-fold scores of the training split, not on 320 validation emails.

    python benchmarks/recipe_cv.py run default --seed 123 --members 3 --save /tmp/cv/base.json
    python benchmarks/recipe_cv.py run default lr=0.001 --seed 123 --members 3 --save /tmp/cv/lr1e-3.json
    python benchmarks/recipe_cv.py tfidf default --seed 123 --save /tmp/cv/tfidf.json
    python benchmarks/recipe_cv.py compare /tmp/cv/base.json /tmp/cv/lr1e-3.json /tmp/cv/tfidf.json

The validation split of the default setup holds 320 emails: one message is 0.3 points, and
recipes that differ by one or two messages a seed cannot be ranked on it (round 9 in
train_recipes.md). `run` splits the data exactly as `model_quality.py` does (`--seed` is the
split seed), cuts the *training* split into folds (stratified by label and by kind of message),
and trains one model per fold on the other folds with the usual validation split for its early
stopping; each model then scores the fold it never saw. Every training message gets a score from
a model that did not learn it and whose epoch was not chosen on it, so a recipe is measured on
6,139 messages at seed 123 (2,239 of them email) instead of 876; the test split is not touched.

Members are trained one after another from seeds seed, seed + 1000, ... (as `--members` does)
and their logit margins saved after each; a second `run` on the same file adds members up to its
`--members`, so several recipes can be taken one member at a time. A file thus holds the
out-of-fold scores of every ensemble size up to `--members`: `compare --members K` averages the
first K, as the shipped ensemble averages its members' logits. `compare` fits one temperature to
each recipe's averaged margins (one parameter on some 6,000 messages) and reports calibrated NLL
and accuracy (all, email, SMS; per kind also at `--max-fpr`, the bound issue 8 sets) and each
member's own NLL (the spread between seeds), then pairs every recipe with the first: messages
that only one of them gets wrong, and a bootstrap interval of the NLL difference over messages.
`tfidf` takes `model_quality.py`'s TF-IDF + logistic regression through the same folds (each fold
learnt from the other four), so `compare` puts the baseline users would pick beside the recipes.
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from model_quality import EMAIL, SETUPS, SMS, data_options, tfidf_fit
from train_recipes import parse_overrides

from spamfilterd.classifier import encode_text
from spamfilterd.tokenizer import get_tokenizer
from trainer.calibration import calibrated_nll, fit_temperature, log_losses
from trainer.data import Splits, build_splits, source_kind
from trainer.metrics import ham_score_to_clear
from trainer.train import MEMBER_SEED_STRIDE, RECIPES, EncodedSplit, TrainConfig, train, validation_margins

FOLDS = 5
BOOTSTRAP = 2000


def folds_by_label_and_kind(labels: list[int], kinds: list[str], folds: int, seed: int) -> np.ndarray:
    """The fold of each message; every fold gets its share of each (label, kind) pair."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=int)
    groups = sorted(set(zip(labels, kinds, strict=True)))
    pairs = list(zip(labels, kinds, strict=True))
    for group in groups:
        rows = np.array([row for row, pair in enumerate(pairs) if pair == group])
        rng.shuffle(rows)
        fold_of[rows] = np.arange(len(rows)) % folds
    return fold_of


def out_of_fold_margins(splits: Splits, config: TrainConfig, fold_of: np.ndarray) -> tuple[list[float], list]:
    """(margin of every training message from the fold model that held it out, seconds per fold)."""
    tokenizer = get_tokenizer()
    margins = np.empty(len(splits.train))
    seconds = []
    for fold in range(int(fold_of.max()) + 1):
        held_out, rest = splits.train[fold_of == fold], splits.train[fold_of != fold]
        print(f"seed {config.seed}: fold {fold + 1} of {fold_of.max() + 1}", flush=True)
        result = train(Splits(rest, splits.validation, rest.iloc[:0]), config, progress=False)
        encoded = EncodedSplit(
            [encode_text(tokenizer, text, result.max_tokens) for text in held_out["Text"]],
            [int(label) for label in held_out["Label"]],
        )
        margins[fold_of == fold] = validation_margins(result.model, encoded, result.device, result.precision)
        seconds.append(round(result.train_seconds, 1))
    return margins.tolist(), seconds


def _plan(args: argparse.Namespace) -> tuple[Splits, dict, np.ndarray]:
    """The split of `model_quality.py` at this seed, the file's header and each message's fold."""
    options = data_options(args.setup, args.seed, False, args.sms, args.email)
    splits, _ = build_splits(options)
    labels = [int(label) for label in splits.train["Label"]]
    kinds = [source_kind(source) for source in splits.train["Source"]]
    fold_of = folds_by_label_and_kind(labels, kinds, args.folds, args.seed)
    header = {
        "setup": args.setup,
        "split_seed": args.seed,
        "folds": args.folds,
        "labels": labels,
        "kinds": kinds,
    }
    return splits, header, fold_of


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.overrides)
    splits, header, fold_of = _plan(args)
    config = TrainConfig(**{**RECIPES["random"], "precision": "fp32", **overrides, "members": 1})
    saved = {**header, "overrides": overrides, "members": []}
    if args.save.exists():
        earlier = json.loads(args.save.read_text())
        if {**earlier, "members": []} != saved:
            raise SystemExit(f"{args.save} holds another setup, seed, recipe or fold count; pick a new file")
        saved = earlier
    args.save.parent.mkdir(parents=True, exist_ok=True)
    for member in range(len(saved["members"]), args.members):
        seed = args.seed + MEMBER_SEED_STRIDE * member
        started = time.perf_counter()
        margins, seconds = out_of_fold_margins(splits, replace(config, seed=seed), fold_of)
        saved["members"].append(
            {
                "seed": seed,
                "margins": margins,
                "train_s": seconds,
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )
        args.save.write_text(json.dumps(saved))
        print(f"seed {seed}: saved to {args.save}", flush=True)


def tfidf(args: argparse.Namespace) -> None:
    """The same folds through `model_quality.py`'s TF-IDF + logistic regression, for `compare`."""
    splits, header, fold_of = _plan(args)
    margins = np.empty(len(splits.train))
    started = time.perf_counter()
    for fold in range(args.folds):
        margins[fold_of == fold] = tfidf_fit(splits.train[fold_of != fold], args.seed)(
            splits.train[fold_of == fold]
        )
    member = {
        "seed": args.seed,
        "margins": margins.tolist(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.save.parent.mkdir(parents=True, exist_ok=True)
    args.save.write_text(json.dumps({**header, "baseline": "tfidf-lr", "overrides": {}, "members": [member]}))
    print(f"TF-IDF + LR: saved to {args.save}")


def _share(flags: np.ndarray) -> float:
    return round(float(flags.mean()), 5)


def at_fpr(margins: np.ndarray, labels: np.ndarray, max_fpr: float) -> dict:
    """Accuracy where at most `max_fpr` of this ham is flagged: the FPR issue 8 bounds.

    The threshold is counted on the very scores it is judged on, so this is what the best
    threshold at that FPR achieves, a shade above what one counted on validation would. Unlike
    the card's rule (`threshold_for_fpr`) it is neither put on the 0.001 grid nor kept at or
    above 0.5: it ranks the scores, not the daemon's verdicts."""
    cleared = ham_score_to_clear(labels, margins, max_fpr)
    flagged = margins > cleared if cleared is not None else np.ones(len(margins), dtype=bool)
    spam = labels == 1
    return {
        "accuracy": _share(flagged == spam),
        "recall": _share(flagged[spam]),
        "fpr": _share(flagged[~spam]),
    }


def summary(margins: np.ndarray, labels: np.ndarray, kinds: np.ndarray, max_fpr: float) -> dict:
    nll, temperature = calibrated_nll(margins, labels)
    losses = log_losses(margins, labels, temperature)  # each message's, at the one temperature
    right = (margins > 0) == (labels == 1)
    line: dict[str, object] = {
        "calibrated_nll": round(nll, 4),
        "temperature": round(temperature, 3),
        "accuracy": _share(right),
    }
    for kind in sorted(set(kinds)):
        ham, spam = (kinds == kind) & (labels == 0), (kinds == kind) & (labels == 1)
        line[kind] = {
            "calibrated_nll": round(float(losses[kinds == kind].mean()), 4),
            "accuracy": _share(right[kinds == kind]),
            "ham_wrong": int((~right & ham).sum()),
            "spam_wrong": int((~right & spam).sum()),
            "of": f"{int(ham.sum())} ham, {int(spam.sum())} spam",
            f"at_fpr_{max_fpr:g}": at_fpr(margins[kinds == kind], labels[kinds == kind], max_fpr),
        }
    return line


def paired(base: np.ndarray, other: np.ndarray, labels: np.ndarray, kinds: np.ndarray, seed: int) -> dict:
    """How `other` differs from `base` on the same messages (both margins, uncalibrated)."""
    base_right, other_right = (base > 0) == (labels == 1), (other > 0) == (labels == 1)
    loss_gap = log_losses(other, labels, fit_temperature(other, labels)) - log_losses(
        base, labels, fit_temperature(base, labels)
    )
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(BOOTSTRAP, len(labels)))
    low, high = np.quantile(loss_gap[draws].mean(axis=1), [0.025, 0.975])
    line = {
        "nll_gap": round(float(loss_gap.mean()), 4),
        "nll_gap_95": [round(float(low), 4), round(float(high), 4)],
    }
    for kind in sorted(set(kinds)):
        rows = kinds == kind
        line[kind] = {
            "only_other_wrong": int((base_right & ~other_right & rows).sum()),
            "only_base_wrong": int((~base_right & other_right & rows).sum()),
        }
    return line


def compare(args: argparse.Namespace) -> None:
    runs = [json.loads(path.read_text()) for path in args.files]
    first = runs[0]
    for path, saved in zip(args.files, runs, strict=True):
        if saved["labels"] != first["labels"] or saved["split_seed"] != first["split_seed"]:
            raise SystemExit(f"{path}: another split than {args.files[0]}; compare runs of one --seed")
    labels, kinds = np.asarray(first["labels"]), np.asarray(first["kinds"])
    recipes = [saved for saved in runs if "baseline" not in saved] or runs
    size = args.members or min(len(saved["members"]) for saved in recipes)
    averaged = []
    for path, saved in zip(args.files, runs, strict=True):
        members = saved["members"][:size]
        margins = np.mean([member["margins"] for member in members], axis=0)
        averaged.append(margins)
        line = {"file": str(path), "overrides": saved["overrides"], "members": len(members)}
        if "baseline" in saved:
            line["baseline"] = saved["baseline"]
        line |= summary(margins, labels, kinds, args.max_fpr)
        # the spread between seeds of one recipe: what a difference between recipes must exceed
        line["member_nll"] = [round(calibrated_nll(member["margins"], labels)[0], 4) for member in members]
        if averaged[0] is not margins:
            line["vs_first"] = paired(averaged[0], margins, labels, kinds, first["split_seed"])
        print(json.dumps(line))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="out-of-fold margins of one recipe")
    run_parser.add_argument("setup", choices=SETUPS)
    run_parser.add_argument("overrides", nargs="*", help="key=value fields of TrainConfig over the recipe")
    run_parser.add_argument("--members", type=int, default=1)
    run_parser.add_argument("--threads", type=int, default=2)
    tfidf_parser = commands.add_parser("tfidf", help="out-of-fold margins of TF-IDF + LR on the same folds")
    tfidf_parser.add_argument("setup", choices=SETUPS)
    for sub in (run_parser, tfidf_parser):
        sub.add_argument("--seed", type=int, default=123, help="the split seed (run: members add 1000 each)")
        sub.add_argument("--folds", type=int, default=FOLDS)
        sub.add_argument("--sms", type=Path, default=SMS)
        sub.add_argument("--email", type=Path, default=EMAIL)
        sub.add_argument("--save", type=Path, required=True)
    compare_parser = commands.add_parser("compare", help="recipes side by side, paired with the first")
    compare_parser.add_argument("files", nargs="+", type=Path)
    compare_parser.add_argument(
        "--members", type=int, help="average the first K members (default: as many as every file has)"
    )
    compare_parser.add_argument(
        "--max-fpr", type=float, default=0.005, help="also report each kind's accuracy at this FPR"
    )
    args = parser.parse_args()
    {"run": run, "tfidf": tfidf, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
