import json
import math
from dataclasses import replace

import pytest
import torch

from spamfilterd import SpamClassifier
from spamfilterd.checkpoint import CheckpointError
from spamfilterd.classifier import encode_text, pad_batch
from spamfilterd.model import GPTModel
from spamfilterd.tokenizer import PAD_TOKEN_ID, get_tokenizer
from tests.conftest import make_tiny_checkpoint

TEXTS = [
    "WINNER!! You have been selected to receive a £900 prize reward! Call 09061701461.",
    "Ok lar... Joking wif u oni...",
    "Hi",
    "Are we still on for lunch tomorrow? I can bring the documents you asked for last week.",
    "",
]


def test_scores_are_probabilities(tiny_checkpoint):
    classifier = SpamClassifier.load(tiny_checkpoint, device="cpu", precision="fp32")
    scores = classifier.score(TEXTS)
    assert len(scores) == len(TEXTS) and all(0.0 <= s <= 1.0 for s in scores)
    label, score = classifier.classify(TEXTS[0])
    assert label == classifier.thresholds.verdict(score) and score == pytest.approx(scores[0], abs=1e-5)
    assert classifier.model_id.startswith("tiny-test@") and classifier.max_tokens == 64


def test_classify_has_the_daemons_unsure_band(tmp_path):
    checkpoint = make_tiny_checkpoint(tmp_path / "all-unsure", thresholds={"spam": 1.0, "unsure": 0.0})
    assert SpamClassifier.load(checkpoint, device="cpu").classify(TEXTS[0])[0] == "unsure"


def test_temperature_from_the_card_scales_the_logits(tmp_path):
    plain = SpamClassifier.load(make_tiny_checkpoint(tmp_path / "t1"), device="cpu")
    hot = SpamClassifier.load(make_tiny_checkpoint(tmp_path / "t3", temperature=3.0), device="cpu")
    assert hot.temperature == 3.0 and plain.temperature == 1.0
    for p_plain, p_hot in zip(plain.score(TEXTS), hot.score(TEXTS), strict=True):
        margin = math.log(p_plain / (1 - p_plain))
        assert p_hot == pytest.approx(1 / (1 + math.exp(-margin / 3)), abs=1e-5)


@pytest.mark.parametrize("bad", [0, -1.0, "2", float("inf")])
def test_a_bad_temperature_is_refused_with_the_file_named(tmp_path, bad):
    checkpoint = make_tiny_checkpoint(tmp_path / "bad")
    card = json.loads((checkpoint / "model.json").read_text())
    (checkpoint / "model.json").write_text(json.dumps({**card, "temperature": bad}))  # a hand-edited card
    with pytest.raises(CheckpointError, match=r"model\.json: 'temperature' must be a positive number"):
        SpamClassifier.load(checkpoint, device="cpu")


def test_batch_and_alone_agree(tiny_checkpoint):
    """Padding must not leak into a message's score: each row is read at its own last real token."""
    classifier = SpamClassifier.load(tiny_checkpoint, device="cpu", precision="fp32", batch_size=16)
    batched = classifier.score(TEXTS)
    alone = [classifier.score([text])[0] for text in TEXTS]
    assert batched == pytest.approx(alone, abs=1e-5)
    # And the padded positions really differ from the last real ones (else the test proves nothing).
    ids, last = pad_batch([encode_text(classifier.tokenizer, t, 64) for t in TEXTS[:3]])
    with torch.no_grad():
        logits = classifier.model(ids)
    assert not torch.allclose(logits[:, -1], classifier.model(ids, last))
    assert torch.allclose(logits[torch.arange(3), last], classifier.model(ids, last))


def test_bf16_stays_close_to_fp32(tiny_checkpoint):
    fp32 = SpamClassifier.load(tiny_checkpoint, device="cpu", precision="fp32").score(TEXTS)
    bf16 = SpamClassifier.load(tiny_checkpoint, device="cpu", precision="bf16").score(TEXTS)
    assert bf16 == pytest.approx(fp32, abs=0.01)


def test_long_text_keeps_head_and_tail():
    tokenizer = get_tokenizer()
    text = "START " + "filler " * 500 + "THE END"
    ids = encode_text(tokenizer, text, 40)
    assert len(ids) == 40
    assert tokenizer.decode(ids[:2]).startswith("START")
    assert tokenizer.decode(ids[-3:]).endswith("THE END")
    assert encode_text(tokenizer, "", 40) == [PAD_TOKEN_ID]
    assert PAD_TOKEN_ID not in encode_text(tokenizer, "hi <|endoftext|> there", 40)


def test_bad_device_and_precision(tiny_checkpoint, monkeypatch):
    with pytest.raises(ValueError, match="precision 'fp8'"):
        SpamClassifier.load(tiny_checkpoint, device="cpu", precision="fp8")
    # A machine without a GPU, also where this test runs on one: `cuda` is refused, `auto` is the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"device '{device}' requested but no CUDA GPU is available"):
            SpamClassifier.load(tiny_checkpoint, device=device)
    assert SpamClassifier.load(tiny_checkpoint, device="auto").device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_scores_like_the_cpu(tiny_checkpoint):
    cuda = SpamClassifier.load(tiny_checkpoint, device="cuda", precision="fp32")
    assert next(cuda.model.parameters()).device.type == "cuda"
    cpu = SpamClassifier.load(tiny_checkpoint, device="cpu", precision="fp32")
    assert cuda.score(TEXTS) == pytest.approx(cpu.score(TEXTS), abs=1e-4)


def test_a_model_handed_over_in_training_mode_is_scored_without_dropout(tiny_checkpoint):
    """Dropout at scoring time would make one message score differently on every call."""
    loaded = SpamClassifier.load(tiny_checkpoint, device="cpu")
    dropping = GPTModel(replace(loaded.model.cfg, drop_rate=0.5), n_outputs=2)
    dropping.load_state_dict(loaded.model.state_dict())
    classifier = SpamClassifier(dropping.train(), loaded.card, torch.device("cpu"), "fp32")
    texts = ["WINNER!! claim your prize now", "see you at six"] * 4
    assert classifier.score(texts) == classifier.score(texts) == loaded.score(texts)
