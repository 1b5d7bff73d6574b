"""GPTModel's shape rules: presets and the class head."""

import pytest
import torch

from spamfilterd.model import PRESETS, GPTModel, classifier_from


def test_presets_and_classifier_head():
    assert PRESETS["gpt2-small"].emb_dim == 768 and PRESETS["gpt2-xl"].n_heads == 25
    mini = GPTModel(PRESETS["gpt-mini"])
    n_params = sum(p.numel() for p in mini.parameters())
    assert 10e6 < n_params < 30e6
    model = classifier_from(GPTModel(PRESETS["gpt-tiny"]))
    assert model(torch.zeros((2, 5), dtype=torch.long)).shape == (2, 5, 2)
    with pytest.raises(ValueError, match="exceed the context length"):
        model(torch.zeros((1, PRESETS["gpt-tiny"].context_length + 1), dtype=torch.long))
