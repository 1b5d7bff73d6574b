"""The `spamfilterd-train` command: training is the default command, `evaluate` compares checkpoints.

`spamfilterd-train --data F --out DIR` and `spamfilterd-train train --data F --out DIR` are the
same; options left unset come from the recipe for the chosen weights (trainer.train.RECIPES).
"""

import json
import sys
from pathlib import Path

import click

from spamfilterd import __version__
from spamfilterd.classifier import DEVICES, PRECISIONS
from trainer.crossval import FOLDS
from trainer.errors import DataError
from trainer.metrics import DEFAULT_MAX_FPR, DEFAULT_UNSURE_FPR
from trainer.model_setup import TRAINABLE_CHOICES
from trainer.train import RECIPES, SCHEDULES, TrainConfig

HELP = {"help_option_names": ["-h", "--help"]}


class DefaultCommandGroup(click.Group):
    """A group that runs `train` when the first argument is an option rather than a sub-command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


def _friendly_errors(run):
    """Known failures become one `Error: ...` line and exit status 1, not a traceback."""
    from spamfilterd.checkpoint import CheckpointError
    from trainer.pretrained import WeightsError

    try:
        return run()
    except (DataError, CheckpointError, WeightsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(cls=DefaultCommandGroup, context_settings=HELP, invoke_without_command=False)
@click.version_option(__version__, prog_name="spamfilterd-train")
def main() -> None:
    """Train (default command) and evaluate spamfilterd's GPT spam classifier.

    \b
    spamfilterd-train --data SMSSpamCollection --out models/sms
    spamfilterd-train --weights gpt2-small --out models/sms-gpt2
    spamfilterd-train --ham ~/Maildir/.Archive --spam ~/Maildir/.Junk --out models/mine
    spamfilterd-train evaluate --model models/mine --test-csv held_out.csv --json

    Run `spamfilterd-train train --help` for every training option.
    """


def _paths(values: tuple[str, ...]) -> list[Path]:
    return [Path(value) for value in values]


@main.command(context_settings=HELP)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output directory: model.safetensors, model.json (model card), PNG plots.",
)
@click.option(
    "--name", help="Model name in the card and in X-Spam headers' model id [spamfilterd-ARCH-DATE]."
)
@click.option(
    "--data",
    type=click.Path(exists=True, path_type=Path),
    help="SMSSpamCollection file, its folder, or the UCI zip. Default: the cached copy in "
    "$XDG_CACHE_HOME/spamfilterd, else a checked download.",
)
@click.option(
    "--sms/--no-sms",
    "use_sms",
    default=True,
    show_default=True,
    help="Use the SMS corpus (turn off to train on --ham/--spam mail only).",
)
@click.option(
    "--balance/--no-balance",
    default=True,
    show_default=True,
    help="Reference split: undersample ham to the spam count; --no-balance keeps all, stratified.",
)
@click.option("--dedup", is_flag=True, help="Drop repeated texts of the SMS corpus before splitting.")
@click.option(
    "--train-csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Explicit training split: CSV with header Label,Text or Label,Path (ham/spam or 0/1).",
)
@click.option(
    "--val-csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Explicit validation split (default: 10 % cut from --train-csv).",
)
@click.option(
    "--test-csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Explicit test split (default: 20 % cut from --train-csv).",
)
@click.option(
    "--ham",
    multiple=True,
    type=click.Path(exists=True),
    help="Your good mail: maildir, mbox or folder of .eml files (repeatable).",
)
@click.option(
    "--spam",
    multiple=True,
    type=click.Path(exists=True),
    help="Your spam: maildir, mbox or folder of .eml files (repeatable).",
)
@click.option(
    "--email-corpus",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A public-corpus-style directory: folders named *ham* are ham, spam* are spam "
    "(e.g. SpamAssassin's easy_ham, hard_ham, spam). Repeatable; split 70/10/20 stratified.",
)
@click.option(
    "--weights",
    default="random",
    show_default=True,
    help="random, gpt2-small|gpt2-medium|gpt2-large|gpt2-xl (downloaded), or a local GPT-2 "
    "directory / .safetensors file.",
)
@click.option("--arch", help="Preset for --weights random (gpt-mini, gpt-micro, gpt-tiny, gpt2-small ...).")
@click.option(
    "--recipe",
    type=click.Choice(sorted(RECIPES)),
    help="Defaults to start from [random for --weights random, else reference].",
)
@click.option("--trainable", type=click.Choice(TRAINABLE_CHOICES), help="Parameters to train.")
@click.option(
    "--epochs", type=click.IntRange(min=1), help="Passes over the training data (overrides --steps)."
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    help="Optimizer steps; epochs = steps / (training messages / batch size), rounded up.",
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate (AdamW).")
@click.option("--weight-decay", type=click.FloatRange(min=0))
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--warmup", type=click.FloatRange(0, 1), help="Warm-up, as a fraction of all steps.")
@click.option("--schedule", type=click.Choice(SCHEDULES), help="Learning-rate schedule after warm-up.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True))
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    help="Token budget per message [longest training message, capped at the context length].",
)
@click.option(
    "--members",
    type=click.IntRange(min=1),
    help="Models to train and average (an ensemble): member k starts from seed SEED + 1000 k; each "
    "costs a whole training run, and scoring costs as many forward passes.",
)
@click.option("--seed", type=int, default=123, show_default=True, help="Seed for the split, init and order.")
@click.option(
    "--eval-every",
    type=click.IntRange(min=1),
    default=TrainConfig.eval_every,
    show_default=True,
    help="Steps between loss evaluations.",
)
@click.option(
    "--eval-batches",
    type=click.IntRange(min=1),
    default=TrainConfig.eval_batches,
    show_default=True,
    help="Batches per loss evaluation.",
)
@click.option(
    "--max-fpr",
    type=click.FloatRange(0, 1),
    default=DEFAULT_MAX_FPR,
    show_default=True,
    help="Target false-positive rate for the spam threshold, met on validation data.",
)
@click.option(
    "--unsure-fpr",
    type=click.FloatRange(0, 1),
    default=DEFAULT_UNSURE_FPR,
    show_default=True,
    help="Looser false-positive rate that starts the unsure band.",
)
@click.option(
    "--cv-folds",
    type=click.IntRange(min=0),
    default=FOLDS,
    show_default=True,
    help="When validation holds too few ham to measure --max-fpr (under 1/max-fpr), count the "
    "thresholds on this many cross-validation folds of train + validation instead (0 = never).",
)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="auto = bf16 autocast on GPUs that have it, else fp32.",
)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch [torch's default].")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar.")
def train(**options) -> None:
    """Fine-tune a GPT classifier and write a checkpoint, model card and plots to --out.

    \b
    Options shown without a default come from the recipe:
      random     (for --weights random): 3 averaged gpt-micro members, all parameters,
                 3,000 steps each, AdamW lr 5e-4, wd 0.1, batch 8, 5 % warm-up then
                 cosine, dropout 0.1, 256 tokens
      reference  (for pretrained weights): last block + final norm + head, 5 epochs,
                 AdamW lr 5e-5, wd 0.1, batch 8, constant lr, no dropout, 1 member
    """
    from trainer.data import DataOptions, build_splits
    from trainer.pipeline import train_and_write

    if options["threads"]:
        import torch

        torch.set_num_threads(options["threads"])
    recipe_name = options["recipe"] or ("random" if options["weights"] == "random" else "reference")
    recipe = RECIPES[recipe_name]
    knobs = {name: value for name, value in options.items() if name in TrainConfig.__dataclass_fields__}
    set_by_user = {name: value for name, value in knobs.items() if value is not None}
    if options["weights"] == "random":
        recipe = {**recipe, "trainable": "all"}  # random weights have nothing worth freezing
    if options["epochs"] is not None and options["steps"] is None:
        recipe = {**recipe, "steps": None}  # an explicit --epochs replaces the recipe's step budget
    config = TrainConfig(**{**recipe, **set_by_user})
    if config.weights != "random" and options["arch"]:
        raise click.UsageError(
            "--arch only applies to --weights random (pretrained weights bring their shape)"
        )
    data = DataOptions(
        data=options["data"],
        use_sms=options["use_sms"],
        balance=options["balance"],
        dedup=options["dedup"],
        seed=options["seed"],
        train_csv=options["train_csv"],
        val_csv=options["val_csv"],
        test_csv=options["test_csv"],
        ham=_paths(options["ham"]),
        spam=_paths(options["spam"]),
        email_corpus=list(options["email_corpus"]),
    )
    card = _friendly_errors(
        lambda: train_and_write(
            *build_splits(data),
            config,
            options["out"],
            name=options["name"],
            max_fpr=options["max_fpr"],
            unsure_fpr=options["unsure_fpr"],
            progress=options["progress"],
            cv_folds=options["cv_folds"],
        )
    )
    _print_summary(card, options["out"])


def _print_summary(card: dict, out: Path) -> None:
    seconds = card["training"]["train_seconds"]
    click.echo(f"\nmodel {card['name']} written to {out} (trained in {seconds:.0f} s)")
    thresholds = card["thresholds"]
    epochs = ", ".join(map(str, card["ensemble"]["selected_epochs"]))
    click.echo(
        f"thresholds: spam >= {thresholds['spam']:.3f}, unsure >= {thresholds['unsure']:.3f} "
        f"(temperature {card['temperature']:.3f}, epochs kept: {epochs})"
    )
    choice = card["threshold_choice"]
    click.echo(
        f"thresholds counted on {choice['chosen_on']}: {choice['messages']} messages, {choice['ham']} ham"
    )
    click.echo("at the spam threshold (what the filter does):")
    for split, metrics in card["metrics"].items():
        click.echo(f"  {split:<10} {_metrics_line(metrics)}  {_calibration_line(metrics)}")
    for kind, per_split in card["metrics_by_source"].items():
        test = per_split.get("test")
        if test:
            click.echo(f"  test {kind:<5} {_metrics_line(test)}  {_calibration_line(test)}")
    argmax = ", ".join(f"{split} {m['accuracy']:.2%}" for split, m in card["metrics_argmax"].items())
    click.echo(f"accuracy at P(spam) >= 0.5 (the reference's measure): {argmax}")


def _calibration_line(metrics: dict) -> str:
    return f"unsure {metrics['unsure_share']:.1%}  ECE {metrics['ece']:.4f}  Brier {metrics['brier']:.4f}"


def _metrics_line(metrics: dict) -> str:
    return (
        f"n={metrics['n']:<5} accuracy {metrics['accuracy']:.2%}  precision {metrics['precision']:.2%}  "
        f"recall {metrics['recall']:.2%}  F1 {metrics['f1']:.4f}  FPR {metrics['fpr']:.2%}"
    )


@main.command(context_settings=HELP)
@click.option(
    "--model",
    "model",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="Checkpoint directory (or its model.safetensors).",
)
@click.option(
    "--test-csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV with header Label,Text or Label,Path.",
)
@click.option("--ham", multiple=True, type=click.Path(exists=True), help="Good mail (maildir, mbox, folder).")
@click.option("--spam", multiple=True, type=click.Path(exists=True), help="Spam (maildir, mbox, folder).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch [torch's default].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
def evaluate(model: Path, test_csv, ham, spam, as_json: bool, device: str, threads, batch_size: int) -> None:
    """Metrics and speed of a checkpoint on labelled data, at the threshold in its model card."""
    from spamfilterd.classifier import SpamClassifier
    from trainer.evaluate import evaluate as evaluate_checkpoint
    from trainer.evaluate import load_labelled

    def run() -> dict:
        frame = load_labelled(test_csv, _paths(ham), _paths(spam))
        classifier = SpamClassifier.load(model, device=device, threads=threads, batch_size=batch_size)
        return evaluate_checkpoint(classifier, frame)

    result = _friendly_errors(run)
    if as_json:
        json.dump(result, sys.stdout)
        click.echo()
        return
    click.echo(f"model {result['model']} on {result['device']}, spam threshold {result['threshold']:.3f}")
    click.echo(f"  {_metrics_line(result)}  ECE {result['ece']:.4f}  Brier {result['brier']:.4f}")
    confusion = result["confusion"]
    click.echo(
        f"  confusion: {confusion['tn']} ham kept, {confusion['fp']} ham flagged, "
        f"{confusion['fn']} spam missed, {confusion['tp']} spam caught; {result['unsure']} in the unsure band"
    )
    click.echo(f"  speed: {result['messages_per_second']:.1f} messages/s")
