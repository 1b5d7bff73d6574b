"""The model a training run starts from, and which of its parameters it may change.

Pretrained GPT-2 keeps most of what it knows when only the top is tuned (the reference trains the
last block, the final norm and the new head); a randomly initialised model has nothing worth
keeping, so it trains everything.
"""

from dataclasses import replace

from spamfilterd.model import PRESETS, GPTModel, classifier_from
from trainer.pretrained import load_pretrained

TRAINABLE_CHOICES = ("head", "last-block", "last-two-blocks", "all")
PRETRAINED_NAMES = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")


def build_model(weights: str, arch: str, dropout: float) -> GPTModel:
    """A two-class classifier: `weights` is "random" (uses preset `arch`), a GPT-2 name or a path."""
    if weights == "random":
        if arch not in PRESETS:
            raise ValueError(f"unknown --arch '{arch}'; choose one of {', '.join(PRESETS)}")
        return GPTModel(replace(PRESETS[arch], drop_rate=dropout), n_outputs=2)
    pretrained = load_pretrained(weights)
    if dropout:
        # Dropout is fixed at construction, so rebuild with the rate and copy the weights over.
        rebuilt = GPTModel(replace(pretrained.cfg, drop_rate=dropout))
        rebuilt.load_state_dict(pretrained.state_dict())
        pretrained = rebuilt
    return classifier_from(pretrained)


def set_trainable(model: GPTModel, which: str) -> int:
    """Freeze everything except `which`; returns the number of trainable parameters."""
    if which not in TRAINABLE_CHOICES:
        raise ValueError(f"unknown --trainable '{which}'; choose one of {', '.join(TRAINABLE_CHOICES)}")
    model.requires_grad_(which == "all")
    if which != "all":
        model.out_head.requires_grad_(True)
        if which != "head":
            model.final_norm.requires_grad_(True)
            blocks = 1 if which == "last-block" else 2
            for block in list(model.trf_blocks)[-blocks:]:
                block.requires_grad_(True)
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
