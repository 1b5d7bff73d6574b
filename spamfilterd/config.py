"""The configuration: YAML in, one frozen, validated, typed `Config` out.

Each section is a dataclass whose fields are its keys, each declared once with its default and
its check (spamfilterd.schema), so a typo in a rule fails when the admin runs `spamfilterd
check-config`, not when the first spam arrives. This module must not import torch: `check-config`
runs on machines where loading a model is slow.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from spamfilterd.checkpoint import CheckpointError, ModelCard
from spamfilterd.checkpoint_layout import checkpoint_files
from spamfilterd.rules import Rule, parse_rules, rule_to_dict
from spamfilterd.schema import (
    ConfigError,
    choice,
    integer,
    keys,
    number,
    optional,
    parse,
    pattern,
    required,
    section,
    setting,
    string_list,
    text,
)
from spamfilterd.scores import Thresholds, valid_threshold

CONFIG_ENV = "SPAMFILTERD_CONFIG"
SEARCH_PATH = (Path("/etc/spamfilterd/config.yaml"), Path("config.yaml"))
EXIT_CONFIG_ERROR = 78  # EX_CONFIG from sysexits.h, for every command
TRAIN_HINT = "train one with spamfilterd-train --out DIR, or pass --model PATH"


def split_host_port(value: str) -> tuple[str, int]:
    """`host:port` or `[v6addr]:port` → (host, port); ValueError with the reason otherwise."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^\s:\[\]]+):(\d+)", value)
    if not match:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:10025), got {value!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    return host, port


def split_spamd_address(value: str) -> tuple[str, int] | str:
    """`unix:/path` → the path; `host:port` → (host, port); ValueError with the reason otherwise."""
    if value.startswith("unix:"):
        path = value.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"expected an absolute path after unix:, got {value!r}")
        return path
    try:
        return split_host_port(value)
    except ValueError as exc:
        raise ValueError(f"{exc}; or unix:/path for a Unix socket") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_port(value: Any, key: str) -> str:
    try:
        split_host_port(text(value, key))
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return value


def _door(value: Any, key: str) -> str | None:
    """A listening address, or null (or "") for a door that is off."""
    return None if value in (None, "") else _host_port(value, key)


def _spamd_address(value: str, key: str) -> None:
    try:
        split_spamd_address(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _spamd_doors(value: Any, key: str) -> tuple[str, ...]:
    """Each host:port or unix:/path; null or [] for none."""
    return string_list(item=_spamd_address)(value, key) if value else ()


def _network(value: str, key: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{key}: expected a network such as 192.0.2.0/24, got {value!r}") from None


def _threshold(value: Any, key: str) -> float:
    try:
        return valid_threshold(number(positive=False)(value, key))
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _log_level(value: Any, key: str) -> str:
    return choice("debug", "info", "warning", "error", "critical")(value, key).upper()


def _path(value: Any, key: str) -> Path:
    return Path(text(value, key)).expanduser()


@dataclass(frozen=True)
class ModelConfig:
    # Relative to the config file's directory; `--model PATH` (relative to the working directory)
    # replaces it.
    checkpoint: Path = required(_path, TRAIN_HINT)
    device: str = setting("auto", pattern(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"))
    threads: int = setting(0, integer(minimum=0))  # torch CPU threads; 0 = torch's default
    precision: str = setting("auto", choice("auto", "fp32", "bf16"))
    batch_size: int = setting(16, integer())


@dataclass(frozen=True)
class ThresholdsConfig:
    """None = take the threshold from the checkpoint's model card."""

    spam: float | None = setting(None, optional(_threshold))
    unsure: float | None = setting(None, optional(_threshold))

    def validate(self, path: str) -> None:
        if self.spam is not None and self.unsure is not None and self.unsure > self.spam:
            raise ConfigError(f"{path}.unsure: must not be above {path}.spam ({self.unsure} > {self.spam})")


@dataclass(frozen=True)
class MessageConfig:
    max_bytes: int = setting(1_048_576, integer())


@dataclass(frozen=True)
class SmtpConfig:
    listen: str | None = setting("127.0.0.1:10025", _door)  # None = no SMTP door (spamd only)
    downstream: str = setting("127.0.0.1:10026", _host_port)
    protocol: str = setting("smtp", choice("smtp", "lmtp"))  # spoken to clients and downstream alike
    max_message_size: int = setting(26_214_400, integer())
    max_recipients: int = setting(100, integer())
    max_sessions: int = setting(50, integer())
    # All sessions' messages being received or checked.
    max_bytes_in_flight: int = setting(268_435_456, integer())
    command_timeout: float = setting(300.0, number())
    data_timeout: float = setting(120.0, number())
    downstream_timeout: float = setting(60.0, number())
    classify_timeout: float = setting(30.0, number())
    on_classifier_error: str = setting("pass", choice("pass", "tempfail"))
    batch_wait_ms: int = setting(10, integer(minimum=0))
    workers: int = setting(1, integer())

    def validate(self, path: str) -> None:
        if self.max_bytes_in_flight < self.max_message_size:
            raise ConfigError(
                f"{path}.max_bytes_in_flight: must be at least {path}.max_message_size "
                f"({self.max_message_size}), or no message of the largest size could ever pass"
            )


@dataclass(frozen=True)
class SpamdConfig:
    """The spamd-protocol door (spamc, Exim `spamd_address`); off while `listen` is empty."""

    listen: tuple[str, ...] = setting((), _spamd_doors)
    # Client networks a TCP door answers; None = loopback only (and loopback addresses only).
    allowed_networks: tuple[str, ...] | None = setting(None, optional(string_list(item=_network)))
    # Permissions of Unix sockets: every local user, as a loopback port.
    socket_mode: str = setting("0666", pattern(r"0?[0-7]{3}", 'an octal mode in quotes, e.g. "0660"'))
    max_message_size: int = setting(26_214_400, integer())
    max_connections: int = setting(50, integer())
    read_timeout: float = setting(30.0, number())  # seconds a client has to send its whole request

    def validate(self, path: str) -> None:
        for i, address in enumerate(self.listen):
            where = split_spamd_address(address)
            if isinstance(where, tuple) and self.allowed_networks is None and not is_loopback(where[0]):
                raise ConfigError(
                    f"{path}.listen[{i}]: {where[0]} is not a loopback address; list the client networks"
                    f" allowed to connect in {path}.allowed_networks (like spamd's --allowed-ips)"
                )


@dataclass(frozen=True)
class HttpConfig:
    listen: str | None = setting(None, optional(_host_port))  # the health/metrics endpoint; None = off


@dataclass(frozen=True)
class LoggingConfig:
    level: str = setting("INFO", _log_level)
    format: str = setting("text", choice("text", "json"))


@dataclass(frozen=True)
class Config:
    model: ModelConfig = section(ModelConfig)
    thresholds: ThresholdsConfig = section(ThresholdsConfig)
    message: MessageConfig = section(MessageConfig)
    rules: tuple[Rule, ...] = setting((), parse_rules)  # spamfilterd.rules holds their grammar
    smtp: SmtpConfig = section(SmtpConfig)
    spamd: SpamdConfig = section(SpamdConfig)
    http: HttpConfig = section(HttpConfig)
    logging: LoggingConfig = section(LoggingConfig)
    source: Path | None = None  # the file it was read from; None = built-in defaults

    def validate(self, path: str) -> None:
        if self.smtp.listen is None and not self.spamd.listen:
            raise ConfigError("smtp.listen is null and spamd.listen is empty: set at least one of them")


def find_config(path: Path | None) -> Path | None:
    """`--config`, then `$SPAMFILTERD_CONFIG`, then the first of SEARCH_PATH that exists."""
    if path is not None:
        return Path(path)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return next((p for p in SEARCH_PATH if p.is_file()), None)


def load_config(path: Path | None = None, model_override: Path | None = None) -> Config:
    """Find, read and validate the config; `model_override` (`--model`) replaces model.checkpoint."""
    source = find_config(path)
    data: Any = {}
    name = str(source) if source else "built-in defaults"
    if source is not None:
        try:
            data = yaml.safe_load(source.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found (pass --config PATH)") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config file: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: invalid YAML: {_one_line(exc)}") from None
        source = source.resolve()
    try:
        return _build(data, source, model_override)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _build(data: Any, source: Path | None, model_override: Path | None) -> Config:
    if model_override is not None:
        data = _with_checkpoint(data, Path(model_override).expanduser().resolve())
    config = parse(Config, data, "")
    base = source.parent if source else Path.cwd()
    checkpoint = (base / config.model.checkpoint).resolve()
    for needed in checkpoint_files(checkpoint) if checkpoint.exists() else (checkpoint,):
        if not needed.is_file():
            raise ConfigError(f"model.checkpoint: file not found: {needed} ({TRAIN_HINT})")
    return replace(config, model=replace(config.model, checkpoint=checkpoint), source=source)


def _with_checkpoint(data: Any, checkpoint: Path) -> Any:
    """The YAML data with model.checkpoint replaced (`--model`); a malformed shape is left to `parse`."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(data, dict | None) or not isinstance(model, dict | None):
        return data
    return {**(data or {}), "model": {**(model or {}), "checkpoint": str(checkpoint)}}


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def read_model_card(checkpoint: Path) -> ModelCard:
    """The checkpoint's model card, read without torch (for check-config)."""
    try:
        return ModelCard.load(checkpoint_files(checkpoint)[1])
    except CheckpointError as exc:
        raise ConfigError(f"model.checkpoint: {exc}") from None


def effective_thresholds(config: Config, card: Thresholds) -> Thresholds:
    """The config's thresholds where it sets them, else the model card's.

    An unsure threshold taken from the card never exceeds the spam threshold, so `spam: 0.0`
    alone really makes everything spam.
    """
    configured = config.thresholds
    spam = card.spam if configured.spam is None else configured.spam
    if configured.unsure is None:
        return Thresholds(spam, min(card.unsure, spam))
    if configured.unsure > spam:
        raise ConfigError(
            f"{config.source or 'built-in defaults'}: thresholds.unsure: {configured.unsure} is above"
            f" the model card's spam threshold {spam} (set thresholds.spam too)"
        )
    return Thresholds(spam, configured.unsure)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The effective config in the YAML form load_config reads (check-config prints it)."""
    data = asdict(config, dict_factory=_yaml_mapping)
    data["rules"] = [rule_to_dict(rule, i) for i, rule in enumerate(config.rules)]
    return {f.name: data[f.name] for f in keys(Config)}


def _yaml_mapping(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """asdict's mappings with YAML's types: paths as strings, tuples as lists."""
    return {
        key: str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        for key, value in items
    }
