"""Where a checkpoint's two files live; torch-free so that config checks stay fast."""

from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"


def checkpoint_files(path: Path) -> tuple[Path, Path]:
    """(weights, card) of a checkpoint directory, its .safetensors file or its model.json."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path / WEIGHTS_FILE, path / CARD_FILE
    if path.suffix == ".json":
        return path.with_name(WEIGHTS_FILE), path
    return path, path.with_suffix(".json")
