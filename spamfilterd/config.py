"""The configuration: YAML in, one frozen, validated, typed `Config` out.

Every key is checked here, at start-up, with its full path in the message, so a typo in a rule
fails when the admin runs `spamfilterd check-config`, not when the first spam arrives. This
module must not import torch: `check-config` runs on machines where loading a model is slow.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spamfilterd.checkpoint_layout import checkpoint_files
from spamfilterd.rules import (
    ACTIONS,
    DEFAULT_REJECT_TEXT,
    DEFAULT_SUBJECT_PREFIX,
    DEFAULT_TEMPFAIL_TEXT,
    EXCLUSIVE_ACTIONS,
    VERDICTS,
    Match,
    Rule,
)
from spamfilterd.scores import threshold_on_grid

CONFIG_ENV = "SPAMFILTERD_CONFIG"
SEARCH_PATH = (Path("/etc/spamfilterd/config.yaml"), Path("config.yaml"))
EXIT_CONFIG_ERROR = 78  # EX_CONFIG from sysexits.h, for every command
TRAIN_HINT = "train one with spamfilterd-train --out DIR, or pass --model PATH"


class ConfigError(Exception):
    """Invalid configuration; the message names the file and the key path and says what was expected."""


@dataclass(frozen=True)
class ModelConfig:
    checkpoint: Path
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = torch's default
    precision: str = "auto"  # auto | fp32 | bf16
    batch_size: int = 16


@dataclass(frozen=True)
class ThresholdsConfig:
    """None = take the threshold from the checkpoint's model card."""

    spam: float | None = None
    unsure: float | None = None


@dataclass(frozen=True)
class MessageConfig:
    max_bytes: int = 1_048_576


@dataclass(frozen=True)
class SmtpConfig:
    listen: str | None = "127.0.0.1:10025"  # None = no SMTP door (spamd only)
    downstream: str = "127.0.0.1:10026"
    protocol: str = "smtp"  # smtp | lmtp, spoken to clients and downstream alike
    max_message_size: int = 26_214_400
    max_recipients: int = 100
    max_sessions: int = 50
    max_bytes_in_flight: int = 268_435_456  # all sessions' messages being received or checked
    command_timeout: float = 300
    data_timeout: float = 120
    downstream_timeout: float = 60
    classify_timeout: float = 30
    on_classifier_error: str = "pass"  # pass | tempfail
    batch_wait_ms: int = 10
    workers: int = 1


@dataclass(frozen=True)
class SpamdConfig:
    """The spamd-protocol door (spamc, Exim `spamd_address`); off while `listen` is empty."""

    listen: tuple[str, ...] = ()  # each host:port or unix:/path
    # Client networks a TCP door answers; None = loopback only (and loopback addresses only).
    allowed_networks: tuple[str, ...] | None = None
    socket_mode: str = "0666"  # permissions of Unix sockets: every local user, as a loopback port
    max_message_size: int = 26_214_400
    max_connections: int = 50
    read_timeout: float = 30  # seconds a client has to send its whole request


@dataclass(frozen=True)
class HttpConfig:
    listen: str | None = None  # host:port of the health/metrics endpoint; None = off


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: str = "text"  # text | json


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    thresholds: ThresholdsConfig = field(default_factory=ThresholdsConfig)
    message: MessageConfig = field(default_factory=MessageConfig)
    rules: tuple[Rule, ...] = ()
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    spamd: SpamdConfig = field(default_factory=SpamdConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: Path | None = None  # the file it was read from; None = built-in defaults


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


def read_card_thresholds(checkpoint: Path) -> dict[str, float]:
    """The model card's thresholds, read without torch (for check-config)."""
    card = checkpoint_files(checkpoint)[1]
    try:
        thresholds = json.loads(card.read_text()).get("thresholds", {})
        return {k: float(v) for k, v in thresholds.items() if k in ("spam", "unsure")}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"model.checkpoint: unreadable model card {card}: {exc}") from None


def effective_thresholds(config: Config, card: dict[str, float]) -> tuple[float, float]:
    """(spam, unsure) on the printed 0.001 grid: the config's values, else the model card's; 0.5
    where neither has one.

    An unsure threshold taken from the card never exceeds the spam threshold, so `spam: 0.0`
    alone really makes everything spam.
    """
    spam, unsure = _chosen_thresholds(config, card)
    return threshold_on_grid(spam), threshold_on_grid(unsure)


def _chosen_thresholds(config: Config, card: dict[str, float]) -> tuple[float, float]:
    configured = config.thresholds
    spam = configured.spam if configured.spam is not None else card.get("spam", 0.5)
    if configured.unsure is None:
        return spam, min(card.get("unsure", spam), spam)
    if configured.unsure > spam:
        raise ConfigError(
            f"{config.source or 'built-in defaults'}: thresholds.unsure: {configured.unsure} is above"
            f" the model card's spam threshold {spam} (set thresholds.spam too)"
        )
    return spam, configured.unsure


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


def config_to_dict(config: Config) -> dict[str, Any]:
    """The effective config in the YAML form load_config reads (check-config prints it)."""
    model = config.model
    return {
        "model": {
            "checkpoint": str(model.checkpoint),
            "device": model.device,
            "threads": model.threads,
            "precision": model.precision,
            "batch_size": model.batch_size,
        },
        "thresholds": {"spam": config.thresholds.spam, "unsure": config.thresholds.unsure},
        "message": {"max_bytes": config.message.max_bytes},
        "rules": [_rule_to_dict(rule, i) for i, rule in enumerate(config.rules)],
        "smtp": {name: getattr(config.smtp, name) for name in SmtpConfig.__dataclass_fields__},
        "spamd": {
            "listen": list(config.spamd.listen),
            "allowed_networks": _optional_list(config.spamd.allowed_networks),
            **{name: getattr(config.spamd, name) for name in list(SpamdConfig.__dataclass_fields__)[2:]},
        },
        "http": {"listen": config.http.listen},
        "logging": {"level": config.logging.level, "format": config.logging.format},
    }


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


class _Section:
    """One YAML mapping plus its key path, with typed getters whose errors name the key."""

    def __init__(self, data: Any, path: str, allowed: Iterable[str]):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'top level'}: expected a mapping, got {_kind(data)}")
        allowed = tuple(allowed)
        for key in data:
            if key not in allowed:
                raise ConfigError(
                    f"{self._join(path, key)}: unknown key (expected one of: {', '.join(allowed)})"
                )
        self.data = data
        self.path = path

    @staticmethod
    def _join(path: str, key: Any) -> str:
        return f"{path}.{key}" if path else str(key)

    def key(self, name: str) -> str:
        return self._join(self.path, name)

    def get(self, name: str, default: Any) -> Any:
        return self.data.get(name, default)

    def integer(self, name: str, default: int, minimum: int = 1) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.key(name)}: expected an integer, got {_kind(value)}")
        if value < minimum:
            raise ConfigError(f"{self.key(name)}: expected an integer >= {minimum}, got {value}")
        return value

    def number(self, name: str, default: float | None, positive: bool = True) -> float | None:
        value = self.get(name, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.key(name)}: expected a number, got {_kind(value)}")
        if not math.isfinite(value):  # YAML's .nan and .inf: a timeout of nan drops every session
            raise ConfigError(f"{self.key(name)}: expected a finite number, got {value}")
        if positive and value <= 0:
            raise ConfigError(f"{self.key(name)}: expected a number > 0, got {value}")
        return float(value)

    def text(self, name: str, default: str | None) -> str | None:
        value = self.get(name, default)
        if value is None and default is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{self.key(name)}: expected a non-empty string, got {_kind(value)}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(name, default)
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{self.key(name)}: expected one of: {', '.join(choices)}; got {value!r}")
        return value.lower()

    def host_port(self, name: str, default: str | None) -> str | None:
        value = self.text(name, default)
        if value is None:
            return None
        try:
            split_host_port(value)
        except ValueError as exc:
            raise ConfigError(f"{self.key(name)}: {exc}") from None
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


def _build(data: Any, source: Path | None, model_override: Path | None) -> Config:
    root = _Section(data, "", ("model", "thresholds", "message", "rules", "smtp", "spamd", "http", "logging"))
    base = source.parent if source else Path.cwd()
    smtp, spamd = _smtp(root.get("smtp", None)), _spamd(root.get("spamd", None))
    if smtp.listen is None and not spamd.listen:
        raise ConfigError("smtp.listen is null and spamd.listen is empty: set at least one of them")
    return Config(
        model=_model(root.get("model", None), base, model_override),
        thresholds=_thresholds(root.get("thresholds", None)),
        message=_message(root.get("message", None)),
        rules=parse_rules(root.get("rules", None)),
        smtp=smtp,
        spamd=spamd,
        http=_http(root.get("http", None)),
        logging=_logging(root.get("logging", None)),
        source=source,
    )


def _model(data: Any, base: Path, override: Path | None) -> ModelConfig:
    s = _Section(data, "model", ("checkpoint", "device", "threads", "precision", "batch_size"))
    if override is not None:
        checkpoint = Path(override).expanduser().resolve()
    elif s.get("checkpoint", None) is None:
        raise ConfigError(f"model.checkpoint: not set ({TRAIN_HINT})")
    else:
        checkpoint = (base / Path(s.text("checkpoint", "")).expanduser()).resolve()
    for needed in checkpoint_files(checkpoint) if checkpoint.exists() else (checkpoint,):
        if not needed.is_file():
            raise ConfigError(f"model.checkpoint: file not found: {needed} ({TRAIN_HINT})")
    device = s.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"model.device: expected auto, cpu, cuda or cuda:N; got {device!r}")
    return ModelConfig(
        checkpoint=checkpoint,
        device=device,
        threads=s.integer("threads", 0, minimum=0),
        precision=s.choice("precision", "auto", ("auto", "fp32", "bf16")),
        batch_size=s.integer("batch_size", 16),
    )


def _thresholds(data: Any) -> ThresholdsConfig:
    s = _Section(data, "thresholds", ("spam", "unsure"))
    values = {}
    for name in ("spam", "unsure"):
        value = s.number(name, None, positive=False)
        if value is not None and not 0.0 <= value <= 1.01:
            raise ConfigError(f"thresholds.{name}: expected a probability between 0 and 1.01, got {value}")
        values[name] = value
    if values["spam"] is not None and values["unsure"] is not None and values["unsure"] > values["spam"]:
        raise ConfigError(
            f"thresholds.unsure: must not be above thresholds.spam ({values['unsure']} > {values['spam']})"
        )
    return ThresholdsConfig(**values)


def _message(data: Any) -> MessageConfig:
    return MessageConfig(max_bytes=_Section(data, "message", ("max_bytes",)).integer("max_bytes", 1_048_576))


def _smtp(data: Any) -> SmtpConfig:
    d = SmtpConfig()
    s = _Section(data, "smtp", SmtpConfig.__dataclass_fields__)
    size = s.integer("max_message_size", d.max_message_size)
    if s.integer("max_bytes_in_flight", d.max_bytes_in_flight) < size:
        raise ConfigError(
            f"smtp.max_bytes_in_flight: must be at least smtp.max_message_size ({size}), "
            "or no message of the largest size could ever pass"
        )
    return SmtpConfig(
        listen=s.host_port("listen", d.listen) if s.get("listen", d.listen) not in (None, "") else None,
        downstream=s.host_port("downstream", d.downstream),
        protocol=s.choice("protocol", d.protocol, ("smtp", "lmtp")),
        max_message_size=s.integer("max_message_size", d.max_message_size),
        max_recipients=s.integer("max_recipients", d.max_recipients),
        max_sessions=s.integer("max_sessions", d.max_sessions),
        max_bytes_in_flight=s.integer("max_bytes_in_flight", d.max_bytes_in_flight),
        command_timeout=s.number("command_timeout", d.command_timeout),
        data_timeout=s.number("data_timeout", d.data_timeout),
        downstream_timeout=s.number("downstream_timeout", d.downstream_timeout),
        classify_timeout=s.number("classify_timeout", d.classify_timeout),
        on_classifier_error=s.choice("on_classifier_error", d.on_classifier_error, ("pass", "tempfail")),
        batch_wait_ms=s.integer("batch_wait_ms", d.batch_wait_ms, minimum=0),
        workers=s.integer("workers", d.workers),
    )


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


def _spamd(data: Any) -> SpamdConfig:
    d = SpamdConfig()
    s = _Section(data, "spamd", SpamdConfig.__dataclass_fields__)
    listen = tuple(_string_list(s.get("listen", []), s.key("listen"))) if s.get("listen", []) else ()
    networks = None
    if s.get("allowed_networks", None) is not None:
        networks = _string_list(s.get("allowed_networks", None), s.key("allowed_networks"))
        for i, network in enumerate(networks):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(
                    f"{s.key('allowed_networks')}[{i}]: expected a network such as 192.0.2.0/24,"
                    f" got {network!r}"
                ) from None
    for i, address in enumerate(listen):
        key = f"{s.key('listen')}[{i}]"
        try:
            where = split_spamd_address(address)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        if isinstance(where, tuple) and networks is None and not is_loopback(where[0]):
            raise ConfigError(
                f"{key}: {where[0]} is not a loopback address; list the client networks allowed to"
                " connect in spamd.allowed_networks (like spamd's --allowed-ips)"
            )
    mode = s.get("socket_mode", d.socket_mode)
    if not isinstance(mode, str) or not re.fullmatch(r"0?[0-7]{3}", mode):
        raise ConfigError(
            f'{s.key("socket_mode")}: expected an octal mode in quotes, e.g. "0660"; got {mode!r}'
        )
    return SpamdConfig(
        listen=listen,
        allowed_networks=networks,
        socket_mode=mode,
        max_message_size=s.integer("max_message_size", d.max_message_size),
        max_connections=s.integer("max_connections", d.max_connections),
        read_timeout=s.number("read_timeout", d.read_timeout),
    )


def _optional_list(values: tuple[str, ...] | None) -> list[str] | None:
    return None if values is None else list(values)


def _http(data: Any) -> HttpConfig:
    return HttpConfig(listen=_Section(data, "http", ("listen",)).host_port("listen", None))


def _logging(data: Any) -> LoggingConfig:
    s = _Section(data, "logging", ("level", "format"))
    level = s.choice("level", "info", ("debug", "info", "warning", "error", "critical"))
    return LoggingConfig(level=level.upper(), format=s.choice("format", "text", ("text", "json")))


_MATCH_KEYS = (
    "verdict",
    "score_min",
    "score_max",
    "sender_in",
    "sender_not_in",
    "from_domain_in",
    "from_domain_not_in",
    "recipient_in",
    "recipient_not_in",
)
_ACTION_DEFAULTS = {
    "subject-prefix": DEFAULT_SUBJECT_PREFIX,
    "reject": DEFAULT_REJECT_TEXT,
    "tempfail": DEFAULT_TEMPFAIL_TEXT,
}
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_ADDRESS = re.compile(r"[^@\s<>,\"]+@[^@\s<>,\"]+")


def parse_rules(data: Any) -> tuple[Rule, ...]:
    """The `rules:` list, validated; rules without a name are named by position (`rules[2]`)."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(f"rules: expected a list of rules, got {_kind(data)}")
    rules = tuple(_rule(item, f"rules[{i}]") for i, item in enumerate(data))
    names = [rule.name for rule in rules]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"rules[{i}].name: duplicate rule name {name!r}")
    return rules


def _rule(data: Any, path: str) -> Rule:
    s = _Section(data, path, ("name", "match", "actions"))
    name = s.get("name", None)
    if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
        raise ConfigError(f"{path}.name: expected letters, digits, '_', '.', '-' only; got {name!r}")
    raw_actions = s.get("actions", None)
    if raw_actions is None:
        raise ConfigError(f"{path}.actions: missing (expected a list, e.g. [tag, subject-prefix])")
    if not isinstance(raw_actions, list):
        raw_actions = [raw_actions]
    if not raw_actions:
        raise ConfigError(f"{path}.actions: expected at least one action")
    params: dict[str, Any] = {}
    for i, item in enumerate(raw_actions):
        action, arg = _action(item, f"{path}.actions[{i}]")
        if action in params:
            raise ConfigError(f"{path}.actions[{i}]: action {action!r} given twice")
        params[action] = arg
    for action in EXCLUSIVE_ACTIONS:
        if action in params and len(params) > 1:
            others = ", ".join(a for a in params if a != action)
            raise ConfigError(f"{path}.actions: {action!r} cannot be combined with {others}")
    args = {
        action: arg if arg is not None else _ACTION_DEFAULTS.get(action) for action, arg in params.items()
    }
    return Rule(
        name=name or path,
        match=_match(s.get("match", None), f"{path}.match"),
        actions=tuple(params),
        subject_prefix=args.get("subject-prefix"),
        redirect_to=args.get("redirect"),
        reject_text=args.get("reject"),
        tempfail_text=args.get("tempfail"),
    )


def _action(item: Any, path: str) -> tuple[str, str | None]:
    """An action is a name (`tag`) or a one-key mapping with its argument (`redirect: addr`)."""
    arg = None
    if isinstance(item, dict) and len(item) == 1:
        item, arg = next(iter(item.items()))
    if not isinstance(item, str):
        raise ConfigError(f"{path}: expected an action name or a one-key mapping, got {_kind(item)}")
    if item not in ACTIONS:
        raise ConfigError(f"{path}: unknown action {item!r} (expected one of: {', '.join(ACTIONS)})")
    if arg is not None and not isinstance(arg, str):
        raise ConfigError(f"{path}: the argument of {item} must be a string, got {_kind(arg)}")
    if item in ("accept", "tag") and arg is not None:
        raise ConfigError(f"{path}: {item} takes no argument")
    if item == "redirect" and (arg is None or not _ADDRESS.fullmatch(arg)):
        raise ConfigError(
            f"{path}: redirect needs one address, e.g. {{redirect: quarantine@example.com}}; got {arg!r}"
        )
    if item == "subject-prefix" and arg is not None and not re.fullmatch(r"[ -~]{0,49}[!-~][ -~]{0,49}", arg):
        raise ConfigError(f"{path}: the subject prefix must be 1-50 printable ASCII characters, got {arg!r}")
    if item in ("reject", "tempfail") and arg is not None and not re.fullmatch(r"[ -~]{1,200}", arg):
        raise ConfigError(f"{path}: the {item} text must be 1-200 printable ASCII characters, got {arg!r}")
    return item, arg


def _match(data: Any, path: str) -> Match:
    s = _Section(data, path, _MATCH_KEYS)
    verdicts = s.get("verdict", None)
    if verdicts is not None:
        verdicts = _string_list(verdicts, s.key("verdict"), lower=True)
        for verdict in verdicts:
            if verdict not in VERDICTS:
                expected = ", ".join(VERDICTS)
                raise ConfigError(
                    f"{s.key('verdict')}: unknown verdict {verdict!r} (expected one of: {expected})"
                )
    score_min = s.number("score_min", None, positive=False)
    score_max = s.number("score_max", None, positive=False)
    if score_min is not None and score_max is not None and score_min >= score_max:
        raise ConfigError(f"{path}: score_min ({score_min}) must be below score_max ({score_max})")
    lists = {
        key: _string_list(s.get(key, None), s.key(key), lower=True) if key in s.data else None
        for key in _MATCH_KEYS[3:]
    }
    return Match(verdicts=verdicts, score_min=score_min, score_max=score_max, **lists)


def _string_list(value: Any, path: str, lower: bool = False) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: expected a string or a non-empty list of strings, got {_kind(value)}")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{path}[{i}]: expected a non-empty string, got {_kind(item)}")
    return tuple(item.strip().lower() if lower else item.strip() for item in items)


def _rule_to_dict(rule: Rule, index: int) -> dict[str, Any]:
    match = {
        "verdict": list(rule.match.verdicts) if rule.match.verdicts is not None else None,
        "score_min": rule.match.score_min,
        "score_max": rule.match.score_max,
        **{key: list(getattr(rule.match, key) or ()) or None for key in _MATCH_KEYS[3:]},
    }
    args = {
        "subject-prefix": rule.subject_prefix,
        "redirect": rule.redirect_to,
        "reject": rule.reject_text,
        "tempfail": rule.tempfail_text,
    }
    out: dict[str, Any] = {} if rule.name == f"rules[{index}]" else {"name": rule.name}
    out["match"] = {key: value for key, value in match.items() if value is not None}
    out["actions"] = [{a: args[a]} if args.get(a) else a for a in rule.actions]
    return out
