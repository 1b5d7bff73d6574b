"""Fixtures shared by the whole suite: a real (tiny, random) checkpoint and the SMS corpus."""

from pathlib import Path

import pytest
import torch

from spamfilterd.checkpoint import save_checkpoint
from spamfilterd.model import PRESETS, GPTModel, classifier_from

REPO_ROOT = Path(__file__).resolve().parents[1]
SMS_CORPUS = REPO_ROOT.parent / "shared" / "data" / "sms_spam_collection" / "SMSSpamCollection"


def make_tiny_checkpoint(
    out_dir: Path, thresholds: dict | None = None, seed: int = 0, temperature: object = None
) -> Path:
    """A random `gpt-tiny` classifier saved in the real checkpoint format."""
    torch.manual_seed(seed)
    model = classifier_from(GPTModel(PRESETS["gpt-tiny"]))
    card = {
        "name": "tiny-test",
        "max_tokens": 64,
        "thresholds": thresholds or {"spam": 0.5, "unsure": 0.3},
    }
    if temperature is not None:
        card["temperature"] = temperature
    return save_checkpoint(model, out_dir, card)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="session")
def sms_corpus() -> Path:
    if not SMS_CORPUS.is_file():
        pytest.fail(f"{SMS_CORPUS} is missing: the tests expect ../shared beside the repository")
    return SMS_CORPUS


@pytest.fixture(scope="module")
def lt():
    """An asyncio loop in a thread, for the SMTP and spamd doors (one per test module)."""
    from tests.helpers import LoopThread

    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.close()


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint):
    from spamfilterd.classifier import SpamClassifier

    return SpamClassifier.load(tiny_checkpoint, device="cpu", threads=1)
