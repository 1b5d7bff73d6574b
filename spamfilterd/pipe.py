"""Pipe mode: `spamfilterd classify` for MDAs and scripts, and `spamfilterd check-config`.

Exit codes are the interface here (procmail, maildrop and Postfix `pipe` read them), so every
path out of these commands ends in one of the documented codes, never a traceback. When the
daemon's spamd door is reachable `classify` only asks it (spamfilterd.spamc); torch is imported
only when it must classify in-process.
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

from spamfilterd.config import (
    EXIT_CONFIG_ERROR,
    Config,
    ConfigError,
    config_to_dict,
    effective_thresholds,
    load_config,
    read_model_card,
)
from spamfilterd.rules import Envelope
from spamfilterd.scores import score_on_grid

if TYPE_CHECKING:
    from spamfilterd.engine import CheckResult, FilterEngine
    from spamfilterd.spamc import SpamdClient

EXIT_SPAM, EXIT_HAM, EXIT_UNSURE, EXIT_ERROR = 0, 1, 2, 3
EX_USAGE = 64  # sysexits.h; click's own 2 would read as "unsure"
EX_TEMPFAIL = 75  # sysexits.h: the MDA keeps the message and retries
VERDICT_EXIT = {"spam": EXIT_SPAM, "ham": EXIT_HAM, "unsure": EXIT_UNSURE}
TEMPFAIL_FLAG = "--tempfail-on-error"
# How long the thin client waits for the daemon's answer before falling back.
DAEMON_TIMEOUT_S = 60.0


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
    "--config", "config_path", type=_path, help="Config file (default: see docs/configuration.md)."
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
@click.option(
    "--daemon",
    metavar="ADDRESS",
    help="Ask the daemon at host:port or unix:/path [default: from the config's spamd.listen].",
)
@click.option(
    "--no-fallback",
    is_flag=True,
    help="Daemon unreachable: exit 75, or with --filter pass the message unchanged; never load the model.",
)
def classify(
    inputs: tuple[str, ...],
    config_path: Path | None,
    model_path: Path | None,
    fmt: str | None,
    filter_mode: bool,
    tempfail: bool,
    sender: str,
    recipients: tuple[str, ...],
    daemon: str | None,
    no_fallback: bool,
) -> None:
    """Classify messages: exit 0 spam, 1 ham, 2 unsure, 3 error (one message; see docs/deployment.md)."""
    if filter_mode and len(inputs) != 1:
        _exit("--filter reads exactly one message (- for stdin, or one FILE)", EX_USAGE, tempfail)
    envelope = Envelope(mail_from=sender, rcpt_tos=recipients)
    try:
        engine = _Classifier(config_path, model_path, daemon, no_fallback)
        if filter_mode:
            raw = _read_one(inputs[0])
            try:
                message = engine.check(raw, envelope).message
            except _NoDaemon as exc:  # --no-fallback: the message goes on unchanged, like spamc's
                click.echo(f"spamfilterd: {exc}; message passed on unchanged", err=True)
                message = raw
            sys.stdout.buffer.write(message)
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
        thresholds = effective_thresholds(config, read_model_card(config.model.checkpoint).thresholds)
    except ConfigError as exc:
        _exit(str(exc), EXIT_CONFIG_ERROR, False)
    from spamfilterd import __version__

    source = config.source or "built-in defaults (no config file found)"
    click.echo(f"# spamfilterd {__version__}: effective configuration from {source}")
    click.echo(
        f"# thresholds in effect: spam={thresholds.spam:g} unsure={thresholds.unsure:g}"
        " (null below = from the model card)"
    )
    click.echo(yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True), nl=False)


class _NoDaemon(_Failure):
    """--no-fallback and the daemon did not answer: exit 75, the MDA keeps the message."""

    def __init__(self, message: str):
        super().__init__(message, EX_TEMPFAIL)


class _Classifier:
    """The daemon when one answers, else the in-process engine, loaded only when first needed.

    The daemon is asked when --daemon names it, or when the config lists a spamd.listen address
    and no --model asks for a particular checkpoint. With --daemon the config is read only for a
    fallback, so a user who may not read /etc/spamfilterd/config.yaml can still use the daemon.
    """

    def __init__(
        self, config_path: Path | None, model_path: Path | None, daemon: str | None, no_fallback: bool
    ):
        self._config_path, self._model_path = config_path, model_path
        self._config: Config | None = None
        self._engine: FilterEngine | None = None
        self.no_fallback = no_fallback
        if daemon is None and model_path is None:
            daemon = _configured_daemon(self.config)
        self.client: SpamdClient | None = None
        if daemon is not None:
            from spamfilterd.spamc import SpamdClient

            try:
                self.client = SpamdClient(daemon, DAEMON_TIMEOUT_S)
            except ValueError as exc:
                raise _Failure(f"--daemon: {exc}", EX_USAGE) from None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self._config_path, self._model_path)
        return self._config

    @property
    def model_id(self) -> str:
        return self.client.model_id if self.client is not None else self._local().model_id

    @property
    def spam_threshold(self) -> float:
        return self.client.spam_threshold if self.client is not None else self._local().thresholds.spam

    @property
    def batch_size(self) -> int:
        return self.config.model.batch_size if self.client is None else 16

    def check(self, raw: bytes, envelope: Envelope):
        return self._ask(lambda remote: remote.check(raw, envelope), lambda local: local.check(raw, envelope))

    def check_many(self, raws: list[bytes], envelopes: list[Envelope]):
        return self._ask(
            lambda remote: remote.check_many(raws, envelopes), lambda local: local.check_many(raws, envelopes)
        )

    def _ask(self, remote, local):
        if self.client is None and self.no_fallback:
            raise _NoDaemon("--no-fallback: no daemon to ask (give --daemon, or set spamd.listen)")
        if self.client is not None:
            from spamfilterd.spamc import DaemonUnavailable

            try:
                return remote(self.client)
            except DaemonUnavailable as exc:
                reason = f"the daemon at {self.client.address} did not answer: {exc}"
                if self.no_fallback:
                    raise _NoDaemon(reason) from None
                click.echo(f"spamfilterd: {reason}; classifying in-process (slow)", err=True)
                self.client = None
        return local(self._local())

    def _local(self) -> FilterEngine:
        if self._engine is None:
            self._engine = _load_engine(self.config)
        return self._engine


def _configured_daemon(config: Config) -> str | None:
    """The config's spamd address for this host: a Unix socket first, else the first TCP one."""
    listen = config.spamd.listen
    return next((a for a in listen if a.startswith("unix:")), listen[0] if listen else None)


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
    for name in inputs:
        if name == "-":
            yield "-", _read_one("-")
            continue
        from spamfilterd.mailsource import MailSourceError, iter_messages

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


def _classify_many(engine: _Classifier, inputs: tuple[str, ...], envelope: Envelope, fmt: str) -> int:
    """Classify in model-sized batches; the verdict's exit code for one message, else 0 (3 on errors)."""
    errors: list[str] = []
    records: list[dict] = []
    count = 0
    last_verdict = "ham"
    progress = _progress(enabled=sys.stderr.isatty() and inputs != ("-",))
    for chunk in _chunks(_messages(inputs, errors), engine.batch_size):
        try:
            results = engine.check_many([raw for _, raw in chunk], [envelope] * len(chunk))
        except (_Failure, ConfigError):
            raise
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


class _NoProgress:
    def update(self, _n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool):
    """A tqdm bar on a terminal; tqdm is not even imported otherwise (thin-client start-up time)."""
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(unit="msg", file=sys.stderr)


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
