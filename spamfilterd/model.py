"""The GPT-2 architecture, one short class per concept.

Pre-LayerNorm transformer blocks with causal multi-head attention and a GELU(tanh) feed-forward,
as in OpenAI's GPT-2; the same module serves as language model (vocabulary-sized head) and as
spam classifier (two-way head, see `classifier_from`).
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spamfilterd.tokenizer import VOCAB_SIZE

INIT_STD = 0.02  # GPT-2's initializer_range
RESIDUAL_PROJECTIONS = ("att.proj.weight", "ff.layers.2.weight")  # GPT-2's two c_proj per block


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = VOCAB_SIZE
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),
    # Smaller shapes for training from scratch on a CPU; most of their parameters are the
    # 50,257-row token embedding, which costs a lookup, not compute.
    "gpt-mini": GPTConfig(context_length=512, emb_dim=256, n_heads=4, n_layers=4),  # ~16M
    "gpt-micro": GPTConfig(context_length=512, emb_dim=128, n_heads=4, n_layers=2),  # ~7M
    "gpt-tiny": GPTConfig(context_length=128, emb_dim=32, n_heads=2, n_layers=2),  # tests
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.emb_dim % cfg.n_heads:
            raise ValueError(f"emb_dim {cfg.emb_dim} is not divisible by n_heads {cfg.n_heads}")
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, emb_dim = x.shape
        q, k, v = self.qkv(x).split(emb_dim, dim=2)
        q, k, v = (t.view(batch, tokens, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        # No dropout on the attention weights: with dropout_p > 0 torch leaves the fused kernel for a
        # materialised [tokens x tokens] mask, which tripled the CPU cost of a 256-token training
        # step; dropout on the residual branches (TransformerBlock) still regularises.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, emb_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.att = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.ff = FeedForward(cfg)
        self.drop_resid = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_resid(self.att(self.norm1(x)))
        return x + self.drop_resid(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig, n_outputs: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        # A language-model head is bias-free and, as in GPT-2, shares its matrix with tok_emb (GPT-2's
        # files store no head); a class head is its own Linear with a bias.
        if n_outputs is None:
            self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
            self.out_head.weight = self.tok_emb.weight
        else:
            self.out_head = nn.Linear(cfg.emb_dim, n_outputs, bias=True)
        self.apply(_init_weights)
        # GPT-2's scaled init: each block adds two projections to the residual stream, so their
        # std shrinks with depth and the stream's variance stays ~constant through 2 * n_layers sums.
        for name, param in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(param, std=INIT_STD / math.sqrt(2 * cfg.n_layers))

    @property
    def n_outputs(self) -> int:
        return self.out_head.out_features

    def hidden_states(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [batch, tokens, emb_dim], for heads and auxiliary losses."""
        tokens = token_ids.shape[1]
        if tokens > self.cfg.context_length:
            raise ValueError(f"{tokens} tokens exceed the context length {self.cfg.context_length}")
        positions = torch.arange(tokens, device=token_ids.device)
        x = self.drop_emb(self.tok_emb(token_ids) + self.pos_emb(positions))
        for block in self.trf_blocks:
            x = block(x)
        return self.final_norm(x)

    def forward(self, token_ids: torch.Tensor, last_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, tokens, n_outputs]; with `last_index`, only each row's last real token's
        [batch, n_outputs] (a classifier reads there, so the head runs on one position a row)."""
        hidden = self.hidden_states(token_ids)
        if last_index is not None:
            hidden = last_positions(hidden, last_index)
        return self.out_head(hidden)


class GPTEnsemble(nn.Module):
    """Members of one architecture, trained apart from different seeds, read as one classifier:
    their logits are averaged. Models trained from random weights on a few thousand messages land
    on different solutions seed to seed (benchmarks/train_recipes.md, round 7); the average is
    steadier than any one of them, and better calibrated."""

    def __init__(self, members: list[GPTModel]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg
        self.n_outputs = members[0].n_outputs

    def forward(self, token_ids: torch.Tensor, last_index: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([member(token_ids, last_index) for member in self.members]).mean(dim=0)


def last_positions(states: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """Each row's vector at its last real token: [batch, tokens, features] -> [batch, features]."""
    return states[torch.arange(states.shape[0], device=states.device), last_index.to(states.device)]


def _init_weights(module: nn.Module) -> None:
    """GPT-2's base initialisation (N(0, 0.02), zero biases); it matters when training from random weights."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=INIT_STD)


def classifier_from(model: GPTModel, n_classes: int = 2) -> GPTModel:
    """Replace the language-model head by a fresh `Linear(emb_dim, n_classes)`, in place."""
    head = nn.Linear(model.cfg.emb_dim, n_classes, bias=True)
    _init_weights(head)
    model.out_head = head.to(model.tok_emb.weight.device)
    return model
