"""The generic section parser: one dataclass per section, errors naming the full key path."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from spamfilterd.schema import ConfigError, choice, integer, parse, required, section, setting, text


@dataclass(frozen=True)
class Limits:
    size: int = setting(10, integer())
    mode: str = setting("fast", choice("fast", "safe"))

    def validate(self, path: str) -> None:
        if self.mode == "safe" and self.size > 100:
            raise ConfigError(f"{path}.size: at most 100 in safe mode, got {self.size}")


@dataclass(frozen=True)
class Door:
    where: str = required(text, "set it to host:port")
    limits: Limits = section(Limits)
    note: str | None = None  # bookkeeping, not a key


def _error(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse(Door, data, "door")
    return str(info.value)


def test_defaults_fill_what_is_absent_and_values_are_checked():
    assert parse(Door, {"where": "x"}, "door") == Door(where="x", limits=Limits())
    assert parse(Door, {"where": "x", "limits": None}, "door").limits == Limits()
    parsed = parse(Door, {"where": "x", "limits": {"size": 5, "mode": "SAFE"}}, "door")
    assert parsed.limits == Limits(size=5, mode="safe")


def test_unknown_key_in_a_nested_section_names_it_and_guesses():
    assert _error({"where": "x", "limits": {"szie": 5}}) == (
        "door.limits.szie: unknown key (expected one of: size, mode); did you mean size?"
    )
    assert _error({"where": "x", "limits": {"colour": 1}}) == (
        "door.limits.colour: unknown key (expected one of: size, mode)"
    )
    assert "door.note: unknown key" in _error({"where": "x", "note": "hi"})  # not a key


def test_wrong_types_in_a_nested_section_name_the_key():
    assert (
        _error({"where": "x", "limits": {"size": "5"}})
        == "door.limits.size: expected an integer, got str '5'"
    )
    assert (
        _error({"where": "x", "limits": {"size": True}})
        == "door.limits.size: expected an integer, got bool True"
    )
    assert _error({"where": "x", "limits": [1]}) == "door.limits: expected a mapping, got list [1]"
    assert (
        _error({"where": "x", "limits": {"mode": 3}})
        == "door.limits.mode: expected one of: fast, safe; got 3"
    )


def test_required_keys_and_section_checks():
    assert _error({}) == "door.where: not set (set it to host:port)"
    assert _error({"where": None}) == "door.where: not set (set it to host:port)"
    assert _error({"where": "x", "limits": {"size": 200, "mode": "safe"}}) == (
        "door.limits.size: at most 100 in safe mode, got 200"
    )


def test_a_config_file_error_in_a_nested_section_names_file_and_key(tmp_path, monkeypatch):
    from spamfilterd.config import CONFIG_ENV, load_config

    monkeypatch.delenv(CONFIG_ENV, raising=False)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "model.json").write_text("{}")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model:\n  checkpoint: {tmp_path}\nrules:\n  - match: {{sender: x}}\n    actions: [tag]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(Path(config))
    assert str(info.value) == (
        f"{config}: rules[0].match.sender: unknown key (expected one of: verdict, score_min, score_max,"
        " sender_in, sender_not_in, from_domain_in, from_domain_not_in, recipient_in, recipient_not_in);"
        " did you mean sender_in?"
    )
