import json
import re

import pytest
import torch

from spamfilterd.checkpoint import (
    CheckpointError,
    ModelCard,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from spamfilterd.model import PRESETS, GPTEnsemble, GPTModel, classifier_from
from spamfilterd.scores import Thresholds

from .conftest import make_tiny_checkpoint


def test_round_trip_keeps_weights_and_card(tmp_path):
    out = make_tiny_checkpoint(tmp_path / "ckpt", thresholds={"spam": 0.8, "unsure": 0.4})
    model, card = load_checkpoint(out)
    assert card.thresholds == Thresholds(spam=0.8, unsure=0.4)
    assert card.architecture == PRESETS["gpt-tiny"].to_dict()
    assert card.model_id == f"tiny-test@{card.weights_sha256[:12]}" and len(card.weights_sha256) == 64
    written = json.loads((out / "model.json").read_text())
    assert written["tokenizer"] == "gpt2" and written["labels"] == ["ham", "spam"]
    assert not model.training
    ids = torch.randint(0, 50257, (1, 8))
    again, _ = load_checkpoint(out / "model.safetensors")  # the file form finds model.json beside it
    torch.testing.assert_close(model(ids), again(ids))


def test_missing_file_names_it(tmp_path):
    out = make_tiny_checkpoint(tmp_path / "ckpt")
    (out / "model.json").unlink()
    with pytest.raises(CheckpointError, match=r"model\.json: file not found.*spamfilterd-train"):
        resolve_checkpoint(out)


def test_truncated_weights_are_refused(tmp_path):
    out = make_tiny_checkpoint(tmp_path / "ckpt")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(out)


def test_unreadable_and_mismatched(tmp_path):
    out = make_tiny_checkpoint(tmp_path / "ckpt")
    card = json.loads((out / "model.json").read_text())
    card["architecture"]["n_layers"] = 3
    (out / "model.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_checkpoint(out)
    (out / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable model card"):
        ModelCard.load(out / "model.json")
    del card["weights_sha256"]
    (out / "model.json").write_text(json.dumps(card))
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(out)


def test_a_card_from_before_calibration_loads_with_the_documented_defaults(tmp_path):
    """A card written before `temperature` (and the unsure band) existed scores as it always did."""
    out = make_tiny_checkpoint(tmp_path / "old")
    card = json.loads((out / "model.json").read_text())
    for newer in ("temperature", "format_version", "max_tokens", "n_outputs", "members", "name"):
        card.pop(newer, None)
    card["thresholds"] = {"spam": 0.7}
    (out / "model.json").write_text(json.dumps(card))
    _, loaded = load_checkpoint(out)
    assert (loaded.temperature, loaded.n_outputs, loaded.max_tokens, loaded.name) == (1.0, 2, None, "model")
    assert loaded.thresholds == Thresholds(spam=0.7, unsure=0.7)  # no unsure band
    del card["thresholds"]
    (out / "model.json").write_text(json.dumps(card))
    assert ModelCard.load(out / "model.json").thresholds == Thresholds(spam=0.5, unsure=0.5)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("temperature", "hot", "'temperature' must be a positive number"),
        (
            "thresholds",
            {"spam": 1.5},
            "'thresholds.spam': expected a probability between 0 and 1.01, got 1.5",
        ),
        ("thresholds", {"spam": 0.8, "unsure": "low"}, "'thresholds.unsure': expected a finite number"),
        ("thresholds", [0.8], "'thresholds' must be a mapping"),
        ("max_tokens", 0, "'max_tokens' must be at least 1, got 0"),
        ("n_outputs", "2", "'n_outputs' must be a int, got '2'"),
        ("members", 0, "'members' must be at least 1, got 0"),
        ("name", None, "'name' must be a str, got None"),
        ("format_version", 99, "format_version 99 is newer than this spamfilterd"),
        ("architecture", None, "no 'architecture' in the model card"),
    ],
)
def test_a_bad_card_value_names_the_key_and_the_file(tmp_path, key, value, expected):
    out = make_tiny_checkpoint(tmp_path / "bad")
    card = json.loads((out / "model.json").read_text())
    card[key] = value
    (out / "model.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError) as info:
        ModelCard.load(out / "model.json")
    assert str(info.value).startswith(f"{out / 'model.json'}: ") and expected in str(info.value)


def test_an_unsure_threshold_above_spam_in_a_card_only_empties_the_band(tmp_path):
    out = make_tiny_checkpoint(tmp_path / "odd", thresholds={"spam": 0.6, "unsure": 0.9})
    assert ModelCard.load(out / "model.json").thresholds == Thresholds(spam=0.6, unsure=0.6)


def test_the_trainer_cannot_write_a_card_the_daemon_refuses(tmp_path):
    with pytest.raises(CheckpointError, match="'temperature' must be a positive number"):
        make_tiny_checkpoint(tmp_path / "never", temperature=0.0)
    assert not (tmp_path / "never" / "model.json").exists()


def _tiny_ensemble(members: int) -> GPTEnsemble:
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        models.append(classifier_from(GPTModel(PRESETS["gpt-tiny"])))
    return GPTEnsemble(models).eval()


def test_an_ensemble_round_trips_and_scores_the_mean_of_its_members(tmp_path):
    ensemble = _tiny_ensemble(3)
    out = save_checkpoint(ensemble, tmp_path / "ens", {"name": "ens", "max_tokens": 64})
    written = json.loads((out / "model.json").read_text())
    assert written["members"] == 3 and written["format_version"] == 2
    model, card = load_checkpoint(out)
    assert isinstance(model, GPTEnsemble) and card.members == 3
    ids, last = torch.tensor([[10, 20, 30, 40], [5, 6, 0, 0]]), torch.tensor([3, 1])
    with torch.no_grad():
        members = torch.stack([member(ids, last) for member in ensemble.members])
        assert torch.allclose(model(ids, last), members.mean(dim=0))
        assert not torch.allclose(members[0], members[1])  # the members differ, so the mean is a test


def test_a_single_model_is_still_written_as_format_1(tmp_path):
    """0.1 daemons refuse format_version 2; a one-member checkpoint stays readable by them."""
    written = json.loads((make_tiny_checkpoint(tmp_path / "one") / "model.json").read_text())
    assert written["format_version"] == 1 and written["members"] == 1


@pytest.mark.parametrize(("weights_members", "card_members"), [(1, 2), (1, 10**9), (3, 1), (3, 2)])
def test_a_card_whose_members_do_not_match_the_weights_is_refused(tmp_path, weights_members, card_members):
    """Refused before any model is built: a card saying 10**9 must not try to allocate them."""
    model = _tiny_ensemble(weights_members) if weights_members > 1 else _tiny_ensemble(1).members[0]
    out = save_checkpoint(model, tmp_path / "liar", {"name": "liar"})
    card = json.loads((out / "model.json").read_text())
    card["members"] = card_members
    (out / "model.json").write_text(json.dumps(card))
    said = (
        f"holds {weights_members} member model(s), but {out / 'model.json'} says 'members': {card_members};"
    )
    with pytest.raises(CheckpointError, match=re.escape(said)):
        load_checkpoint(out)
