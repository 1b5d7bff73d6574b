"""Pipe mode: `spamfilterd classify` for MDAs and scripts, and `spamfilterd check-config`.

Exit codes are the interface here (procmail, maildrop and Postfix `pipe` read them), so every
path out of these commands ends in one of the documented codes, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click
import yaml

from spamfilterd import __version__
from spamfilterd.config import (
    EXIT_CONFIG_ERROR,
    Config,
    ConfigError,
    config_to_dict,
    effective_thresholds,
    load_config,
    read_card_thresholds,
)
from spamfilterd.rules import Envelope
from spamfilterd.scores import score_on_grid

if TYPE_CHECKING:
    from spamfilterd.engine import CheckResult, FilterEngine

EXIT_SPAM, EXIT_HAM, EXIT_UNSURE, EXIT_ERROR = 0, 1, 2, 3
EX_USAGE = 64  # sysexits.h; click's own 2 would read as "unsure"
EX_TEMPFAIL = 75  # sysexits.h: the MDA keeps the message and retries
VERDICT_EXIT = {"spam": EXIT_SPAM, "ham": EXIT_HAM, "unsure": EXIT_UNSURE}
TEMPFAIL_FLAG = "--tempfail-on-error"


class _PipeCommand(click.Command):
    """Usage errors exit 64 (or 75 with --tempfail-on-error), never click's 2, which means unsure."""

    def make_context(self, info_name, args, parent=None, **extra):
        tempfail = TEMPFAIL_FLAG in args
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            exc.exit_code = EX_TEMPFAIL if tempfail else EX_USAGE
            raise


class _Failure(Exception):
    """An error that ends the command with `code` (turned into 75 by --tempfail-on-error)."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def _exit(message: str, code: int, tempfail: bool) -> NoReturn:
    click.echo(f"spamfilterd: error: {message}", err=True)
    sys.exit(EX_TEMPFAIL if tempfail else code)


_path = click.Path(dir_okay=True, path_type=Path)
_config_option = click.option(
    "--config", "config_path", type=_path, help="Config file (default: see README, Configuration)."
)
_model_option = click.option(
    "--model", "model_path", type=_path, help="Checkpoint directory or file; overrides model.checkpoint."
)


@click.command("classify", cls=_PipeCommand)
@click.argument("inputs", nargs=-1, required=True, metavar="(- | FILE | MBOX | MAILDIR)...")
@_config_option
@_model_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "jsonl"]),
    help="Output format [default: text for '-', jsonl for files].",
)
@click.option("--filter", "filter_mode", is_flag=True, help="Write the tagged message to stdout.")
@click.option(TEMPFAIL_FLAG, "tempfail", is_flag=True, help="Exit 75 (EX_TEMPFAIL) on any error.")
@click.option("--sender", default="", help="Envelope sender, for rules that match on it.")
@click.option("--recipient", "recipients", multiple=True, help="Envelope recipient (repeatable).")
def classify(
    inputs: tuple[str, ...],
    config_path: Path | None,
    model_path: Path | None,
    fmt: str | None,
    filter_mode: bool,
    tempfail: bool,
    sender: str,
    recipients: tuple[str, ...],
) -> None:
    """Classify messages: exit 0 spam, 1 ham, 2 unsure, 3 error (one message; see README)."""
    if filter_mode and len(inputs) != 1:
        _exit("--filter reads exactly one message (- for stdin, or one FILE)", EX_USAGE, tempfail)
    envelope = Envelope(mail_from=sender, rcpt_tos=recipients)
    try:
        config = load_config(config_path, model_path)
        engine = _load_engine(config)
        if filter_mode:
            result = engine.check(_read_one(inputs[0]), envelope)
            sys.stdout.buffer.write(result.message)
            sys.stdout.buffer.flush()
            return
        code = _classify_many(engine, inputs, envelope, fmt or ("text" if inputs == ("-",) else "jsonl"))
    except ConfigError as exc:
        _exit(str(exc), EXIT_CONFIG_ERROR, tempfail)
    except _Failure as exc:
        _exit(str(exc), exc.code, tempfail)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        _exit("standard output was closed before all output was written", EXIT_ERROR, tempfail)
    except Exception as exc:  # the MDA must see a documented exit code, never Python's 1 (= ham)
        _exit(f"unexpected {type(exc).__name__}: {exc}", EXIT_ERROR, tempfail)
    if code == EXIT_ERROR and tempfail:
        sys.exit(EX_TEMPFAIL)
    sys.exit(code)


@click.command("check-config", cls=_PipeCommand)
@_config_option
@_model_option
def check_config(config_path: Path | None, model_path: Path | None) -> None:
    """Validate the config and the checkpoint files; print the effective config as YAML."""
    try:
        config = load_config(config_path, model_path)
        card = read_card_thresholds(config.model.checkpoint)
        spam, unsure = effective_thresholds(config, card)
    except ConfigError as exc:
        _exit(str(exc), EXIT_CONFIG_ERROR, False)
    source = config.source or "built-in defaults (no config file found)"
    click.echo(f"# spamfilterd {__version__}: effective configuration from {source}")
    click.echo(f"# thresholds in effect: spam={spam:g} unsure={unsure:g} (null below = from the model card)")
    click.echo(yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True), nl=False)


def _load_engine(config: Config) -> FilterEngine:
    from spamfilterd.engine import FilterEngine

    try:
        return FilterEngine.from_config(config)
    except ConfigError:
        raise
    except Exception as exc:  # a damaged checkpoint, no GPU, out of memory: say what and where
        raise _Failure(f"cannot load the model {config.model.checkpoint}: {exc}") from exc


def _read_one(name: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise _Failure(f"{name}: cannot read the message: {exc.strerror or exc}") from exc


def _messages(inputs: tuple[str, ...], errors: list[str]) -> Iterator[tuple[str, bytes]]:
    """Every message of every input; an unreadable input is reported and skipped, not fatal."""
    from spamfilterd.mailsource import MailSourceError, iter_messages

    for name in inputs:
        if name == "-":
            yield "-", _read_one("-")
            continue
        try:
            yield from iter_messages(Path(name))
        except MailSourceError as exc:  # its message names the path and what to pass instead
            errors.append(name)
            click.echo(f"spamfilterd: error: {exc}", err=True)
        except OSError as exc:
            errors.append(name)
            click.echo(f"spamfilterd: error: {name}: {exc.strerror or exc}", err=True)


def _chunks(messages: Iterator[tuple[str, bytes]], size: int) -> Iterator[list[tuple[str, bytes]]]:
    chunk: list[tuple[str, bytes]] = []
    for item in messages:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _classify_many(engine: FilterEngine, inputs: tuple[str, ...], envelope: Envelope, fmt: str) -> int:
    """Classify in model-sized batches; the verdict's exit code for one message, else 0 (3 on errors)."""
    from tqdm import tqdm

    errors: list[str] = []
    records: list[dict] = []
    count = 0
    last_verdict = "ham"
    progress = tqdm(unit="msg", file=sys.stderr, disable=not sys.stderr.isatty() or inputs == ("-",))
    for chunk in _chunks(_messages(inputs, errors), engine.config.model.batch_size):
        try:
            results = engine.check_many([raw for _, raw in chunk], [envelope] * len(chunk))
        except Exception as exc:
            first = chunk[0][0]
            raise _Failure(f"classifier failed on a batch starting with {first}: {exc}") from exc
        for (name, _), result in zip(chunk, results, strict=True):
            record = _record(name, result, engine.model_id, engine.spam_threshold)
            if fmt == "json":
                records.append(record)
            else:
                click.echo(_render(record, fmt, single=inputs == ("-",)))
            last_verdict = result.decision.verdict
        count += len(chunk)
        progress.update(len(chunk))
    progress.close()
    if fmt == "json":
        click.echo(json.dumps(records[0] if count == 1 else records, indent=2, ensure_ascii=False))
    if errors:
        return EXIT_ERROR
    return VERDICT_EXIT[last_verdict] if count == 1 else 0


def _record(name: str, result: CheckResult, model_id: str, required: float) -> dict:
    decision = result.decision
    return {
        "file": name,
        "verdict": decision.verdict,
        "score": score_on_grid(decision.score),
        "required": required,
        "actions": list(decision.actions),
        "rule": decision.rule,
        "model": model_id,
        "text_chars": result.text_chars,
        "notes": result.notes,
    }


def _render(record: dict, fmt: str, single: bool) -> str:
    if fmt == "jsonl":
        return json.dumps(record, ensure_ascii=False)
    actions = ",".join(record["actions"])
    line = f"{record['verdict']} {record['score']:.3f} rule={record['rule']} actions={actions}"
    return line if single else f"{record['file']}: {line}"
