"""One training run from data to `--out DIR`: train, measure every split, choose thresholds, write
the checkpoint with its model card, draw the plots."""

import datetime as dt
import platform
from pathlib import Path

import torch

from spamfilterd.checkpoint import save_checkpoint
from trainer.data import DataOptions, Splits, build_splits
from trainer.metrics import (
    DEFAULT_MAX_FPR,
    DEFAULT_UNSURE_FPR,
    choose_thresholds,
    classification_metrics,
    roc_curve,
)
from trainer.plots import plot_curves, plot_test_scores
from trainer.train import TrainConfig, TrainResult, config_dict, score_texts, train

CURVES_PNG = "training_curves.png"
SCORES_PNG = "test_scores.png"


def default_name(config: TrainConfig) -> str:
    base = config.arch if config.weights == "random" else Path(config.weights).name
    return f"spamfilterd-{base}-{dt.datetime.now(dt.UTC):%Y%m%d}"


def _score_splits(result: TrainResult, splits: Splits) -> dict[str, tuple[list[int], list[float]]]:
    return {
        name: (
            [int(label) for label in frame["Label"]],
            score_texts(
                result.model, list(frame["Text"]), result.max_tokens, result.device, result.precision
            ),
        )
        for name, frame in splits.items()
    }


def build_card(
    name: str,
    config: TrainConfig,
    result: TrainResult,
    data_card: dict,
    scored: dict[str, tuple[list[int], list[float]]],
    max_fpr: float,
    unsure_fpr: float,
) -> dict:
    """The model card: where the data came from, how the model was trained, how well it does."""
    thresholds = choose_thresholds(*scored["validation"], max_fpr=max_fpr, unsure_fpr=unsure_fpr)
    total = sum(parameter.numel() for parameter in result.model.parameters())
    return {
        "name": name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "max_tokens": result.max_tokens,
        "thresholds": thresholds,
        "threshold_choice": {
            "chosen_on": "validation",
            "max_fpr": max_fpr,
            "unsure_fpr": unsure_fpr,
            "rule": "spam: lowest threshold >= 0.5 with validation FPR <= max_fpr; "
            "unsure: validation FPR <= unsure_fpr, between spam/2 and spam",
        },
        "data": data_card,
        "training": {
            **config_dict(config),
            "device": result.device,
            "precision": result.precision,
            "train_seconds": round(result.train_seconds, 1),
            "trainable_parameters": result.trainable_parameters,
            "total_parameters": total,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "metrics": {
            split: classification_metrics(labels, scores, thresholds["spam"])
            for split, (labels, scores) in scored.items()
        },
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
        },
        "plots": [CURVES_PNG, SCORES_PNG],
    }


def run_training(
    data: DataOptions,
    config: TrainConfig,
    out: Path,
    name: str | None = None,
    max_fpr: float = DEFAULT_MAX_FPR,
    unsure_fpr: float = DEFAULT_UNSURE_FPR,
    progress: bool = True,
) -> dict:
    """Everything `spamfilterd-train` does; returns the model card that was written."""
    splits, data_card = build_splits(data)
    result = train(splits, config, progress=progress)
    scored = _score_splits(result, splits)
    card = build_card(name or default_name(config), config, result, data_card, scored, max_fpr, unsure_fpr)
    out = Path(out)
    save_checkpoint(result.model, out, card)
    plot_curves(result.history, out / CURVES_PNG)
    plot_test_scores(*scored["test"], card["thresholds"], out / SCORES_PNG)
    return card
