import pytest
import torch

from spamfilterd import SpamClassifier
from spamfilterd.classifier import encode_text, last_token_logits, pad_batch
from spamfilterd.tokenizer import PAD_TOKEN_ID, get_tokenizer

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
    assert label == ("spam" if score >= 0.5 else "ham") and score == pytest.approx(scores[0], abs=1e-5)
    assert classifier.model_id.startswith("tiny-test@") and classifier.max_tokens == 64


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
    assert not torch.allclose(logits[:, -1], last_token_logits(logits, last))


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


def test_bad_device_and_precision(tiny_checkpoint):
    with pytest.raises(ValueError, match="precision 'fp8'"):
        SpamClassifier.load(tiny_checkpoint, device="cpu", precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            SpamClassifier.load(tiny_checkpoint, device="cuda")
