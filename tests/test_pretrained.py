"""The trainer's GPT-2 weight loader, and our GPT-2 against transformers' own GPT2LMHeadModel."""

import pytest
import torch
import transformers

from spamfilterd.model import GPTConfig, GPTModel
from trainer.pretrained import WeightsError, load_pretrained

# Large random weights: at GPT-2's default init scale a wrong GELU variant or LayerNorm epsilon
# still agrees to 1e-4; at 0.2 it does not.
SHAPES = [
    {"n_layer": 2, "n_head": 4, "n_embd": 64},
    {"n_layer": 3, "n_head": 2, "n_embd": 48},
]


def _reference_model(tmp_path, n_layer: int, n_head: int, n_embd: int):
    config = transformers.GPT2Config(
        vocab_size=1000,
        n_positions=64,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        initializer_range=0.2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    return reference


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s['n_layer']}L{s['n_head']}H{s['n_embd']}")
@pytest.mark.parametrize("form", ["directory", "file"])
def test_logits_match_transformers(tmp_path, shape, form):
    reference = _reference_model(tmp_path, **shape)
    source = tmp_path if form == "directory" else tmp_path / "model.safetensors"
    ours = load_pretrained(source).eval()
    assert ours.cfg.n_heads == shape["n_head"] and ours.cfg.n_layers == shape["n_layer"]
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (3, 40))
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    assert got.shape == (3, 40, 1000)
    assert ours.out_head.weight is ours.tok_emb.weight  # tied, as GPT-2's file has no separate head
    assert expected.abs().max() > 1.0  # the weights are large enough to expose small mistakes
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_single_file_without_config_infers_gpt2_shape(tmp_path):
    """A bare .safetensors of a GPT-2 size needs no config.json: heads follow from emb_dim."""
    from safetensors.torch import save_file

    cfg = GPTConfig(vocab_size=100, context_length=16, emb_dim=768, n_heads=12, n_layers=1)
    model = GPTModel(cfg)  # a language model: its head is tok_emb, as in GPT-2's files, which store none
    tensors = {"wte.weight": model.tok_emb.weight, "wpe.weight": model.pos_emb.weight}
    tensors |= {"ln_f.weight": model.final_norm.weight, "ln_f.bias": model.final_norm.bias}
    block = model.trf_blocks[0]
    for key, param, transpose in [
        ("ln_1.weight", block.norm1.weight, False),
        ("ln_1.bias", block.norm1.bias, False),
        ("attn.c_attn.weight", block.att.qkv.weight, True),
        ("attn.c_attn.bias", block.att.qkv.bias, False),
        ("attn.c_proj.weight", block.att.proj.weight, True),
        ("attn.c_proj.bias", block.att.proj.bias, False),
        ("ln_2.weight", block.norm2.weight, False),
        ("ln_2.bias", block.norm2.bias, False),
        ("mlp.c_fc.weight", block.ff.layers[0].weight, True),
        ("mlp.c_fc.bias", block.ff.layers[0].bias, False),
        ("mlp.c_proj.weight", block.ff.layers[2].weight, True),
        ("mlp.c_proj.bias", block.ff.layers[2].bias, False),
    ]:
        tensors[f"h.0.{key}"] = param.t() if transpose else param
    path = tmp_path / "bare.safetensors"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    loaded = load_pretrained(path).eval()
    assert loaded.cfg == cfg
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model.eval()(ids), atol=1e-5, rtol=0)


def test_offline_preset_download_names_file_and_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        load_pretrained("gpt2-small", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "openai-community/gpt2/resolve/main/model.safetensors" in message
    assert "--weights" in message


def test_missing_and_broken_sources(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        load_pretrained(tmp_path / "nope")
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x00" * 10)
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_pretrained(broken)
