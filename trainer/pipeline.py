"""One training run from data to `--out DIR`: train, measure every split, choose thresholds, write
the checkpoint with its model card, draw the plots."""

import datetime as dt
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spamfilterd.checkpoint import save_checkpoint
from spamfilterd.scores import Thresholds
from trainer.calibration import ECE_BINS, reliability
from trainer.crossval import FOLDS, cross_validated_scores, on_scale_of, same_scale
from trainer.data import Splits, source_kind
from trainer.metrics import (
    DEFAULT_MAX_FPR,
    DEFAULT_UNSURE_FPR,
    can_measure,
    choose_thresholds,
    classification_metrics,
    roc_curve,
    split_metrics,
)
from trainer.plots import plot_curves, plot_reliability, plot_test_scores
from trainer.train import TrainConfig, TrainResult, config_dict, member_seeds, score_texts, train

CURVES_PNG = "training_curves.png"
SCORES_PNG = "test_scores.png"
RELIABILITY_PNG = "reliability.png"


def default_name(config: TrainConfig) -> str:
    base = config.arch if config.weights == "random" else Path(config.weights).name
    return f"spamfilterd-{base}-{dt.datetime.now(dt.UTC):%Y%m%d}"


def score_splits(result: TrainResult, splits: Splits) -> dict[str, tuple[list[int], list[float]]]:
    return {
        name: (
            [int(label) for label in frame["Label"]],
            score_texts(
                result.model,
                list(frame["Text"]),
                result.max_tokens,
                result.temperature,
                result.device,
                result.precision,
            ),
        )
        for name, frame in splits.items()
    }


def metrics_by_source(
    splits: Splits, scored: dict[str, tuple[list[int], list[float]]], thresholds: Thresholds
) -> dict[str, dict[str, dict]]:
    """Each split's metrics per kind of message (sms, email, csv), when it holds more than one kind."""
    by_source: dict[str, dict[str, dict]] = {}
    for split, frame in splits.items():
        labels, scores = scored[split]
        kinds = [source_kind(source) for source in frame["Source"]]
        if len(set(kinds)) < 2:
            continue
        for kind in sorted(set(kinds)):
            rows = [row for row, row_kind in enumerate(kinds) if row_kind == kind]
            by_source.setdefault(kind, {})[split] = split_metrics(
                [labels[row] for row in rows], [scores[row] for row in rows], thresholds
            )
    return by_source


@dataclass
class ThresholdScores:
    """Scored messages the thresholds are counted on, and where they come from."""

    labels: list[int]
    scores: list[float]
    origin: str


def threshold_scores(
    splits: Splits,
    validation: tuple[list[int], list[float]],
    config: TrainConfig,
    max_fpr: float,
    cv_folds: int,
    progress: bool,
) -> ThresholdScores:
    """The validation scores when they can measure `max_fpr`, else cross-validated ones (carried
    onto the final model's scale by rank when validation shows it is another)."""
    labels, scores = validation
    if can_measure(labels, max_fpr) or cv_folds < 2:
        return ThresholdScores(labels, scores, "validation")
    pooled = cross_validated_scores(splits, config, cv_folds, progress)
    origin = f"{cv_folds}-fold cross-validation over train + validation (validation too small)"
    if same_scale(pooled, validation, max_fpr):
        return ThresholdScores(*pooled, origin)
    return ThresholdScores(
        pooled[0],
        on_scale_of(pooled[1], scores),
        f"{origin}, carried onto the final model's scale by rank (its validation spam fell short of "
        "the threshold counted on the fold models' scores)",
    )


def build_card(
    name: str,
    config: TrainConfig,
    result: TrainResult,
    data_card: dict,
    splits: Splits,
    scored: dict[str, tuple[list[int], list[float]]],
    counted: ThresholdScores,
    max_fpr: float,
    unsure_fpr: float,
) -> dict:
    """The model card: where the data came from, how the model was trained, how well it does."""
    thresholds = choose_thresholds(counted.labels, counted.scores, max_fpr=max_fpr, unsure_fpr=unsure_fpr)
    total = sum(parameter.numel() for parameter in result.model.parameters())
    return {
        "name": name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "max_tokens": result.max_tokens,
        "temperature": result.temperature,
        "thresholds": asdict(thresholds),
        "calibration": {
            "method": "temperature scaling: logits / T, T fitted to the validation NLL",
            "selection": "each member keeps the epoch with the lowest validation NLL after temperature "
            "scaling (ensemble.selected_epochs)",
            "validation_nll": round(result.validation_nll, 5),
            "ece_bins": ECE_BINS,
        },
        "ensemble": {
            "seeds": member_seeds(config),
            "selected_epochs": result.member_epochs,
            "combination": "the mean of the members' logits, then the temperature",
        },
        "threshold_choice": {
            "chosen_on": counted.origin,
            "messages": len(counted.labels),
            "ham": counted.labels.count(0),
            "max_fpr": max_fpr,
            "unsure_fpr": unsure_fpr,
            "rule": "spam: lowest threshold on the 0.001 grid, from 0.5, whose counted false-positive "
            "rate is <= max_fpr; unsure: the same for unsure_fpr, between spam/2 and spam",
            "metrics": split_metrics(counted.labels, counted.scores, thresholds),
        },
        "data": data_card,
        "training": {
            **config_dict(config),
            "device": result.device,
            "precision": result.precision,
            "epochs_run": result.epochs,
            "train_seconds": round(result.train_seconds, 1),
            "trainable_parameters": result.trainable_parameters,
            "total_parameters": total,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "metrics": {
            split: split_metrics(labels, scores, thresholds) for split, (labels, scores) in scored.items()
        },
        "metrics_by_source": metrics_by_source(splits, scored, thresholds),
        "test_reliability": reliability(*scored["test"]),
        "metrics_argmax": {
            split: classification_metrics(labels, scores, 0.5) for split, (labels, scores) in scored.items()
        },
        "test_roc_auc": roc_curve(*scored["test"])[2],
        "history": {
            "eval_examples": result.history.eval_examples,
            "train_loss": result.history.train_loss,
            "val_loss": result.history.val_loss,
            "train_accuracy": result.history.train_accuracy,
            "val_accuracy": result.history.val_accuracy,
            "val_calibrated_nll": result.history.val_calibrated_nll,
        },
        "plots": [CURVES_PNG, SCORES_PNG, RELIABILITY_PNG],
    }


def train_and_write(
    splits: Splits,
    data_card: dict,
    config: TrainConfig,
    out: Path,
    name: str | None = None,
    max_fpr: float = DEFAULT_MAX_FPR,
    unsure_fpr: float = DEFAULT_UNSURE_FPR,
    progress: bool = True,
    cv_folds: int = FOLDS,
) -> dict:
    """Everything `spamfilterd-train` does once `build_splits` has cut the data (a benchmark may cut
    its own); returns the model card that was written."""
    result = train(splits, config, progress=progress)
    scored = score_splits(result, splits)
    chosen_on = threshold_scores(splits, scored["validation"], config, max_fpr, cv_folds, progress)
    card = build_card(
        name or default_name(config),
        config,
        result,
        data_card,
        splits,
        scored,
        chosen_on,
        max_fpr,
        unsure_fpr,
    )
    out = Path(out)
    save_checkpoint(result.model, out, card)
    plot_curves(result.history, out / CURVES_PNG)
    plot_test_scores(*scored["test"], card["thresholds"], out / SCORES_PNG)
    plot_reliability(card["test_reliability"], card["metrics"]["test"], out / RELIABILITY_PNG)
    return card
