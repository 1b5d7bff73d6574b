"""Training plots as PNG files (matplotlib's Agg backend: no display needed on a server)."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from trainer.metrics import roc_curve
from trainer.train import History


def _examples_axis(ax, epochs: Sequence[float], examples: Sequence[int]) -> None:
    """A second x-axis on top: how many training examples the model had seen at each point."""
    if not len(epochs) or epochs[-1] == 0:
        return
    per_epoch = examples[-1] / epochs[-1]
    top = ax.secondary_xaxis("top", functions=(lambda e: e * per_epoch, lambda n: n / per_epoch))
    top.set_xlabel("examples seen")


def plot_curves(history: History, out: Path) -> Path:
    """Loss (at every evaluation) and accuracy (after every epoch), train vs validation, side by side."""
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    if history.eval_epochs:
        loss_ax.plot(history.eval_epochs, history.train_loss, label="training loss")
        loss_ax.plot(history.eval_epochs, history.val_loss, linestyle="-.", label="validation loss")
        _examples_axis(loss_ax, history.eval_epochs, history.eval_examples)
        loss_ax.legend(loc="upper right")
    else:
        loss_ax.text(0.5, 0.5, "no evaluation ran\n(fewer steps than --eval-every)", ha="center", va="center")
    loss_ax.set_xlabel("epochs")
    loss_ax.set_ylabel("loss (cross-entropy)")
    loss_ax.set_title("Loss")
    epochs = list(range(1, len(history.train_accuracy) + 1))
    acc_ax.plot(epochs, history.train_accuracy, marker="o", label="training accuracy")
    acc_ax.plot(epochs, history.val_accuracy, marker="s", linestyle="-.", label="validation accuracy")
    _examples_axis(acc_ax, epochs, history.epoch_examples)
    acc_ax.set_xlabel("epochs")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_title("Accuracy after each epoch")
    acc_ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    acc_ax.legend(loc="lower right")
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def plot_test_scores(
    labels: Sequence[int], scores: Sequence[float], thresholds: dict[str, float], out: Path
) -> Path:
    """Where test ham and spam land on the score axis, with the chosen thresholds, and the ROC curve."""
    figure, (hist_ax, roc_ax) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    truth, values = np.asarray(labels), np.asarray(scores)
    bins = np.linspace(0.0, 1.0, 41)
    hist_ax.hist(values[truth == 0], bins=bins, alpha=0.65, label=f"ham ({int((truth == 0).sum())})")
    hist_ax.hist(values[truth == 1], bins=bins, alpha=0.65, label=f"spam ({int((truth == 1).sum())})")
    hist_ax.axvline(thresholds["spam"], color="crimson", label=f"spam threshold {thresholds['spam']:.4f}")
    hist_ax.axvline(
        thresholds["unsure"],
        color="darkorange",
        linestyle="--",
        label=f"unsure from {thresholds['unsure']:.4f}",
    )
    hist_ax.set_yscale("log")
    hist_ax.set_xlabel("P(spam)")
    hist_ax.set_ylabel("messages (log scale)")
    hist_ax.set_title("Test set scores")
    hist_ax.legend(loc="upper center")
    fpr, tpr, auc = roc_curve(labels, scores)
    roc_ax.plot(fpr, tpr, label=f"ROC (AUC {auc:.4f})")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    roc_ax.set_xlabel("false-positive rate (ham flagged as spam)")
    roc_ax.set_ylabel("true-positive rate (spam caught)")
    roc_ax.set_title("Test set ROC")
    roc_ax.legend(loc="lower right")
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def plot_reliability(table: list[dict], test_metrics: dict, out: Path) -> Path:
    """Reliability diagram of the test set: mean P(spam) against the share that is spam, per bin."""
    figure, ax = plt.subplots(figsize=(5.5, 5), layout="constrained")
    filled = [row for row in table if row["n"]]
    centres = [(row["low"] + row["high"]) / 2 for row in filled]
    ax.bar(
        centres,
        [row["spam_share"] for row in filled],
        width=0.09,
        alpha=0.7,
        label="share of spam in the bin",
    )
    ax.plot(
        [row["mean_score"] for row in filled],
        [row["spam_share"] for row in filled],
        marker="o",
        color="crimson",
        label="mean P(spam) vs share of spam",
    )
    for centre, row in zip(centres, filled, strict=True):
        ax.annotate(str(row["n"]), (centre, 0.02), ha="center", fontsize=8)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("P(spam) (bins of 0.1; messages per bin at the bottom)")
    ax.set_ylabel("share of spam")
    ax.set_title(f"Test reliability: ECE {test_metrics['ece']:.4f}, Brier {test_metrics['brier']:.4f}")
    ax.legend(loc="upper left")
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
