"""GPTModel's shape rules: presets, the tied language-model head, the class head, GPT-2's init."""

import math

import pytest
import torch

from spamfilterd.model import INIT_STD, PRESETS, GPTConfig, GPTModel, classifier_from


def test_presets_and_classifier_head():
    assert PRESETS["gpt2-small"].emb_dim == 768 and PRESETS["gpt2-xl"].n_heads == 25
    mini = GPTModel(PRESETS["gpt-mini"])
    n_params = sum(p.numel() for p in mini.parameters())
    assert 15e6 < n_params < 17e6  # "~16M": the tied head shares the 50,257-row embedding
    model = classifier_from(GPTModel(PRESETS["gpt-tiny"]))
    assert model(torch.zeros((2, 5), dtype=torch.long)).shape == (2, 5, 2)
    with pytest.raises(ValueError, match="exceed the context length"):
        model(torch.zeros((1, PRESETS["gpt-tiny"].context_length + 1), dtype=torch.long))


def test_language_model_head_is_the_token_embedding():
    lm = GPTModel(PRESETS["gpt-tiny"])
    assert lm.out_head.weight is lm.tok_emb.weight
    assert lm.out_head.bias is None
    with torch.no_grad():
        lm.tok_emb.weight[7].fill_(1.0)
    assert torch.equal(lm.out_head.weight[7], torch.ones(PRESETS["gpt-tiny"].emb_dim))
    state = lm.state_dict()
    assert state["out_head.weight"].data_ptr() == state["tok_emb.weight"].data_ptr()


def test_classifier_head_is_its_own_two_way_linear():
    cfg = PRESETS["gpt-tiny"]
    for model in (GPTModel(cfg, n_outputs=2), classifier_from(GPTModel(cfg))):
        assert model.n_outputs == 2
        assert model.out_head.weight.shape == (2, cfg.emb_dim)
        assert model.out_head.bias is not None
        assert model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
        assert model.tok_emb.weight.shape == (cfg.vocab_size, cfg.emb_dim)


def test_residual_projections_get_gpt2_scaled_init():
    """std 0.02 / sqrt(2 * n_layers) on the two projections into the residual stream, 0.02 elsewhere."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=100, context_length=16, emb_dim=256, n_heads=4, n_layers=8)
    model = GPTModel(cfg, n_outputs=2)
    scaled = INIT_STD / math.sqrt(2 * cfg.n_layers)
    for block in model.trf_blocks:
        for projection in (block.att.proj, block.ff.layers[2]):
            assert projection.weight.std().item() == pytest.approx(scaled, rel=0.05)
            assert not projection.bias.any()
        for expansion in (block.att.qkv, block.ff.layers[0]):
            assert expansion.weight.std().item() == pytest.approx(INIT_STD, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(INIT_STD, rel=0.05)
