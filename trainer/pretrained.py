"""Loading OpenAI's GPT-2 weights in the Hugging Face safetensors layout, to fine-tune from.

A training concern: the daemon only reads spamfilterd's own checkpoints (`spamfilterd.checkpoint`).
Sources: a preset name (`gpt2-small` … downloaded once with huggingface_hub: cached, resumable,
`HF_HUB_OFFLINE` honoured), a local directory with `config.json` + `model.safetensors`, or a
local `.safetensors` file. Never unpickles anything.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from spamfilterd.checkpoint_layout import WEIGHTS_FILE  # Hugging Face uses the same file name
from spamfilterd.model import PRESETS, GPTConfig, GPTModel

HF_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
# GPT-2's published sizes: emb_dim fixes the number of heads when no config.json is at hand.
HEADS_BY_EMB_DIM = {768: 12, 1024: 16, 1280: 20, 1600: 25}

# Our parameter names -> Hugging Face's. Per block, True marks a Conv1D weight stored as [in, out].
TOP_LEVEL_NAMES = {
    "tok_emb.weight": "wte.weight",
    "pos_emb.weight": "wpe.weight",
    "final_norm.weight": "ln_f.weight",
    "final_norm.bias": "ln_f.bias",
}
BLOCK_NAMES = {
    "norm1.weight": ("ln_1.weight", False),
    "norm1.bias": ("ln_1.bias", False),
    "att.qkv.weight": ("attn.c_attn.weight", True),
    "att.qkv.bias": ("attn.c_attn.bias", False),
    "att.proj.weight": ("attn.c_proj.weight", True),
    "att.proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False),
    "norm2.bias": ("ln_2.bias", False),
    "ff.layers.0.weight": ("mlp.c_fc.weight", True),
    "ff.layers.0.bias": ("mlp.c_fc.bias", False),
    "ff.layers.2.weight": ("mlp.c_proj.weight", True),
    "ff.layers.2.bias": ("mlp.c_proj.bias", False),
}


class WeightsError(Exception):
    """Pretrained weights could not be found, fetched or understood; the message says what to do."""


def load_pretrained(source: str | Path, cache_dir: str | None = None) -> GPTModel:
    source_str = str(source)
    if source_str in HF_REPOS:
        path = _download(source_str, cache_dir)
        cfg = PRESETS[source_str]
    else:
        path = Path(source_str).expanduser()
        if path.is_dir():
            path = path / WEIGHTS_FILE
        if not path.is_file():
            raise WeightsError(
                f"{source_str}: no such weights file or directory (expected a directory with "
                f"config.json + {WEIGHTS_FILE}, a .safetensors file, or one of {', '.join(HF_REPOS)})"
            )
        cfg = None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    tensors = {key.removeprefix("transformer."): value for key, value in tensors.items()}
    cfg = cfg or _config_for(path, tensors)
    model = GPTModel(cfg)
    _copy_hf_weights(model, tensors, path)
    return model


def _download(preset: str, cache_dir: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    repo = HF_REPOS[preset]
    try:
        return Path(hf_hub_download(repo, WEIGHTS_FILE, cache_dir=cache_dir))
    except Exception as exc:  # offline mode, DNS failure, proxy, HTTP error: all mean "not here"
        raise WeightsError(
            f"could not download {preset} ({repo}/{WEIGHTS_FILE}): {exc.__class__.__name__}: {exc}\n"
            f"Without internet access, fetch https://huggingface.co/{repo}/resolve/main/{WEIGHTS_FILE} "
            f"and config.json on another machine, copy them into a directory, and pass that "
            f"directory instead (e.g. --weights /path/to/gpt2-dir)."
        ) from exc


def _config_for(path: Path, tensors: dict[str, torch.Tensor]) -> GPTConfig:
    vocab_size, emb_dim = tensors["wte.weight"].shape if "wte.weight" in tensors else (0, 0)
    if not emb_dim:
        raise WeightsError(f"{path}: no 'wte.weight' tensor; this is not a GPT-2 checkpoint")
    config_file = path.with_name("config.json")
    if config_file.is_file():
        hf = json.loads(config_file.read_text())
        return GPTConfig(
            vocab_size=hf.get("vocab_size", vocab_size),
            context_length=hf.get("n_positions", tensors["wpe.weight"].shape[0]),
            emb_dim=hf.get("n_embd", emb_dim),
            n_heads=hf["n_head"],
            n_layers=hf["n_layer"],
        )
    if emb_dim not in HEADS_BY_EMB_DIM:
        raise WeightsError(
            f"{path}: cannot tell the number of attention heads for emb_dim {emb_dim}; "
            f"put the model's config.json beside the file"
        )
    n_layers = len({key.split(".")[1] for key in tensors if key.startswith("h.")})
    return GPTConfig(
        vocab_size=vocab_size,
        context_length=tensors["wpe.weight"].shape[0],
        emb_dim=emb_dim,
        n_heads=HEADS_BY_EMB_DIM[emb_dim],
        n_layers=n_layers,
    )


def _copy_hf_weights(model: GPTModel, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """HF stores attention/MLP weights as Conv1D `[in, out]`: transpose them for nn.Linear."""

    def take(key: str, transpose: bool = False) -> torch.Tensor:
        if key not in tensors:
            raise WeightsError(f"{path}: tensor '{key}' is missing; this is not a GPT-2 checkpoint")
        value = tensors[key].float()
        return value.t() if transpose else value

    def assign(param: torch.nn.Parameter, value: torch.Tensor, name: str) -> None:
        if param.shape != value.shape:
            raise WeightsError(
                f"{path}: '{name}' has shape {tuple(value.shape)}, expected {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(value)

    params = dict(model.named_parameters())  # the tied head is tok_emb.weight, listed once
    for ours, theirs in TOP_LEVEL_NAMES.items():
        assign(params[ours], take(theirs), theirs)
    for i in range(model.cfg.n_layers):
        for ours, (theirs, transpose) in BLOCK_NAMES.items():
            key = f"h.{i}.{theirs}"
            assign(params[f"trf_blocks.{i}.{ours}"], take(key, transpose), key)
