"""The `spamfilterd-train` entry point: training needs the `train` extra, which serving does not.

`pip install spamfilterd` serves mail without pandas, matplotlib or huggingface_hub; without them the
trainer says what to install instead of failing with a traceback deep inside an import.
"""

import importlib.util
import sys

TRAIN_EXTRA = ("pandas", "matplotlib", "huggingface_hub")


def main() -> None:
    missing = [name for name in TRAIN_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(
            f"spamfilterd-train: {', '.join(missing)} not installed; training needs the train extra: "
            "pip install 'spamfilterd[train]'"
        )
    from trainer.cli import main as train_main

    train_main()
