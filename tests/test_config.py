"""Config loading: defaults, search order, relative paths, and errors that name file and key."""

import shutil
from pathlib import Path

import pytest
import yaml

from spamfilterd.config import (
    CONFIG_ENV,
    Config,
    ConfigError,
    ModelConfig,
    SmtpConfig,
    ThresholdsConfig,
    config_to_dict,
    effective_thresholds,
    load_config,
    split_host_port,
)
from spamfilterd.scores import Thresholds

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory with a (fake, torch-free) checkpoint at models/default and no config around."""
    checkpoint = tmp_path / "models" / "default"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"")
    (checkpoint / "model.json").write_text('{"thresholds": {"spam": 0.6, "unsure": 0.4}}')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    return tmp_path


def _write(directory: Path, data, name="spam.yaml") -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _error(directory: Path, data) -> str:
    path = _write(directory, {"model": {"checkpoint": "models/default"}, **data})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


def test_repository_default_config_is_valid_and_round_trips(workdir):
    shutil.copy(REPO_CONFIG, workdir / "config.yaml")
    config = load_config(None)  # found as ./config.yaml
    assert config.source == workdir / "config.yaml"
    assert config.model.checkpoint == workdir / "models" / "default"
    assert config.smtp == SmtpConfig()
    assert [rule.name for rule in config.rules] == ["postmaster", "spam", "unsure"]
    dumped = _write(workdir / "models", config_to_dict(config), "dumped.yaml")
    again = load_config(dumped)
    assert again.rules == config.rules and again.model == config.model and again.smtp == config.smtp
    assert config.spamd.listen == ("unix:/run/spamfilterd/spamd.sock",)
    assert again.spamd == config.spamd


def test_smtp_door_may_be_off_when_the_spamd_door_is_on(workdir):
    data = {"model": {"checkpoint": "models/default"}, "smtp": {"listen": None}}
    data["spamd"] = {"listen": ["127.0.0.1:7830", "[::1]:7830"], "socket_mode": "0600"}
    config = load_config(_write(workdir, data, "spamd-only.yaml"))
    assert config.smtp.listen is None
    assert config.spamd.listen == ("127.0.0.1:7830", "[::1]:7830")
    dumped = load_config(_write(workdir, config_to_dict(config), "dumped.yaml"))
    assert dumped.spamd == config.spamd and dumped.smtp == config.smtp


def test_search_order_env_then_cwd(workdir, monkeypatch):
    _write(workdir, {"model": {"checkpoint": "models/default"}, "message": {"max_bytes": 5}}, "config.yaml")
    other = workdir / "etc"
    other.mkdir()
    _write(other, {"model": {"checkpoint": "../models/default"}, "message": {"max_bytes": 7}}, "c.yaml")
    assert load_config(None).message.max_bytes == 5
    monkeypatch.setenv(CONFIG_ENV, str(other / "c.yaml"))
    assert load_config(None).message.max_bytes == 7  # relative to the config file's directory
    monkeypatch.setenv(CONFIG_ENV, str(other / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(None)


def test_no_config_file_needs_model_override(workdir):
    if Path("/etc/spamfilterd/config.yaml").exists():
        pytest.skip("a system config exists on this machine")
    with pytest.raises(ConfigError, match=r"built-in defaults: model.checkpoint: not set .*--model PATH"):
        load_config(None)
    config = load_config(None, model_override=Path("models/default"))
    assert config == Config(model=config.model)
    assert config.model.checkpoint == workdir / "models" / "default"


def test_model_override_replaces_config_checkpoint(workdir):
    path = _write(workdir, {"model": {"checkpoint": "nowhere"}})
    assert (
        load_config(path, Path("models/default/model.safetensors")).model.checkpoint.name
        == "model.safetensors"
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"modle": {}},
            "modle: unknown key (expected one of: model, thresholds, message, rules, smtp, spamd, http,"
            " logging)",
        ),
        ({"smtp": {"listne": "x"}}, "smtp.listne: unknown key (expected one of: listen, downstream,"),
        (
            {"smtp": {"listen": "localhost"}},
            "smtp.listen: expected host:port (e.g. 127.0.0.1:10025), got 'localhost'",
        ),
        ({"smtp": {"downstream": "[::1]:70000"}}, "smtp.downstream: port 70000 out of range 1-65535"),
        ({"smtp": {"protocol": "esmtp"}}, "smtp.protocol: expected one of: smtp, lmtp; got 'esmtp'"),
        ({"smtp": {"max_sessions": 0}}, "smtp.max_sessions: expected an integer >= 1, got 0"),
        ({"smtp": {"data_timeout": -1}}, "smtp.data_timeout: expected a number > 0, got -1"),
        ({"smtp": {"workers": True}}, "smtp.workers: expected an integer, got bool True"),
        (
            {"smtp": {"max_message_size": 1000, "max_bytes_in_flight": 999}},
            "smtp.max_bytes_in_flight: must be at least smtp.max_message_size (1000)",
        ),
        ({"http": {"listen": "9025"}}, "http.listen: expected host:port"),
        ({"logging": {"format": "xml"}}, "logging.format: expected one of: text, json; got 'xml'"),
        ({"thresholds": {"spam": 2}}, "thresholds.spam: expected a probability between 0 and 1.01, got 2.0"),
        (
            {"thresholds": {"spam": 0.4, "unsure": 0.6}},
            "thresholds.unsure: must not be above thresholds.spam",
        ),
        (
            {"model": {"checkpoint": "models/default", "device": "tpu"}},
            "model.device: expected auto, cpu, cuda",
        ),
        ({"model": {"checkpoint": "models/default", "precision": "fp8"}}, "model.precision: expected one of"),
        ({"message": {"max_bytes": "1MB"}}, "message.max_bytes: expected an integer, got str '1MB'"),
        ({"rules": {"name": "x"}}, "rules: expected a list of rules"),
        (
            {"rules": [{"actions": ["tag"]}, {"actions": ["tag"]}, {"match": {}, "actions": ["tagg"]}]},
            "rules[2].actions[0]: unknown action 'tagg' (expected one of: "
            "accept, tag, subject-prefix, redirect, reject, tempfail)",
        ),
        (
            {"rules": [{"match": {"verdict": "spma"}, "actions": ["tag"]}]},
            "rules[0].match.verdict: unknown verdict",
        ),
        ({"rules": [{"match": {"sender": "x"}, "actions": ["tag"]}]}, "rules[0].match.sender: unknown key"),
        (
            {"rules": [{"match": {"sender_in": []}, "actions": ["tag"]}]},
            "rules[0].match.sender_in: expected a",
        ),
        ({"rules": [{"match": {}}]}, "rules[0].actions: missing"),
        ({"rules": [{"actions": ["reject", "redirect"]}]}, "rules[0].actions[1]: redirect needs one address"),
        (
            {"rules": [{"actions": ["reject", {"redirect": "q@example.com"}]}]},
            "rules[0].actions: 'reject' cannot be combined with redirect",
        ),
        (
            {"rules": [{"actions": ["accept", "tag"]}]},
            "rules[0].actions: 'accept' cannot be combined with tag",
        ),
        ({"rules": [{"actions": ["tag", "tag"]}]}, "rules[0].actions[1]: action 'tag' given twice"),
        ({"rules": [{"actions": [{"tag": "x"}]}]}, "rules[0].actions[0]: tag takes no argument"),
        (
            {"rules": [{"actions": [{"subject-prefix": "Spam\n"}]}]},
            "rules[0].actions[0]: the subject prefix must",
        ),
        ({"rules": [{"name": "has space", "actions": ["tag"]}]}, "rules[0].name: expected letters"),
        (
            {"rules": [{"name": "a", "actions": ["tag"]}, {"name": "a", "actions": ["tag"]}]},
            "rules[1].name: duplicate rule name 'a'",
        ),
        (
            {"rules": [{"match": {"score_min": 0.9, "score_max": 0.5}, "actions": ["tag"]}]},
            "rules[0].match: score_min (0.9) must be below score_max (0.5)",
        ),
    ],
)
def test_errors_name_the_key_and_what_was_expected(workdir, data, expected):
    assert expected in _error(workdir, data)


def test_missing_checkpoint_says_what_to_do(workdir):
    message = _error(workdir, {"model": {"checkpoint": "/x"}})
    hint = "(train one with spamfilterd-train --out DIR, or pass --model PATH)"
    assert message == f"model.checkpoint: file not found: /x {hint}"
    (workdir / "models" / "default" / "model.json").unlink()
    assert "file not found: " + str(workdir / "models/default/model.json") in _error(workdir, {})


def test_yaml_syntax_and_shape_errors(workdir):
    bad = _write(workdir, "model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"spam.yaml: invalid YAML: .*line 1"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"spam\.yaml: top level: expected a mapping, got list"):
        load_config(_write(workdir, "- just a list\n"))


def test_actions_with_arguments_and_defaults(workdir):
    path = _write(
        workdir,
        {
            "model": {"checkpoint": "models/default"},
            "rules": [
                {"match": {"verdict": "spam"}, "actions": "reject"},
                {"actions": [{"tempfail": "later"}]},
                {"actions": ["tag", {"subject-prefix": "***SPAM***"}, {"redirect": "q@example.com"}]},
            ],
        },
    )
    rules = load_config(path).rules
    assert rules[0].reject_text == "Message rejected as spam"
    assert rules[1].tempfail_text == "later"
    assert (rules[2].subject_prefix, rules[2].redirect_to) == ("***SPAM***", "q@example.com")


def test_effective_thresholds():
    def effective(**thresholds):
        config = Config(model=ModelConfig(Path("m")), thresholds=ThresholdsConfig(**thresholds))
        found = effective_thresholds(config, Thresholds(spam=0.6, unsure=0.4))
        return found.spam, found.unsure

    assert effective() == (0.6, 0.4)
    assert effective(spam=0.0) == (0.0, 0.0)
    assert effective(spam=1.01, unsure=1.01) == (1.01, 1.01)
    assert effective(unsure=0.2) == (0.6, 0.2)
    assert effective(spam=0.5004) == (0.501, 0.4)  # on the printed grid
    expected = r"built-in defaults: thresholds\.unsure: 0\.7 is above the model card's spam threshold 0\.6"
    with pytest.raises(ConfigError, match=expected):
        effective(unsure=0.7)


def test_split_host_port():
    assert split_host_port("[::1]:10025") == ("::1", 10025)
    assert split_host_port("mx.example.com:25") == ("mx.example.com", 25)
    with pytest.raises(ValueError):
        split_host_port("::1:25")


def test_config_is_frozen(workdir):
    config = load_config(None, Path("models/default"))
    with pytest.raises(AttributeError):
        config.model = None


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("smtp", "data_timeout", ".nan"),
        ("smtp", "command_timeout", ".inf"),
        ("smtp", "classify_timeout", ".NaN"),
        ("smtp", "downstream_timeout", "-.inf"),
        ("thresholds", "spam", ".nan"),
        ("thresholds", "unsure", ".inf"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(workdir, section, key, value):
    """A `.nan` timeout passed validation and then made the daemon drop every session."""
    path = _write(workdir, f"model:\n  checkpoint: models/default\n{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: {section}\.{key}: expected a finite number, got"):
        load_config(path)


def test_non_finite_score_bounds_in_a_rule_are_refused(workdir):
    rule = "rules:\n  - match: {score_min: -.inf}\n    actions: [tag]\n"
    path = _write(workdir, "model:\n  checkpoint: models/default\n" + rule)
    expected = r"rules\[0\]\.match\.score_min: expected a finite number, got -inf"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
