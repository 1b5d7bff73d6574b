import json

import pytest
import torch

from spamfilterd.checkpoint import CheckpointError, load_checkpoint, read_card, resolve_checkpoint
from spamfilterd.model import PRESETS

from .conftest import make_tiny_checkpoint


def test_round_trip_keeps_weights_and_card(tmp_path):
    out = make_tiny_checkpoint(tmp_path / "ckpt", thresholds={"spam": 0.8, "unsure": 0.4})
    model, card = load_checkpoint(out)
    assert card["thresholds"] == {"spam": 0.8, "unsure": 0.4}
    assert card["architecture"] == PRESETS["gpt-tiny"].to_dict()
    assert card["tokenizer"] == "gpt2" and card["labels"] == ["ham", "spam"]
    assert len(card["weights_sha256"]) == 64
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
        read_card(out / "model.json")
    del card["weights_sha256"]
    (out / "model.json").write_text(json.dumps(card))
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(out)
