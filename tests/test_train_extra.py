"""The daemon installs without the training libraries; the trainer says what to install without them."""

import subprocess
import sys
import tomllib
from pathlib import Path

from trainer.launch import TRAIN_EXTRA

ROOT = Path(__file__).resolve().parents[1]
BLOCK = "import sys\nfor name in {names!r}: sys.modules[name] = None\n"


def _run(code: str, names=TRAIN_EXTRA) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK.format(names=names) + code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_base_dependencies_leave_training_libraries_to_the_train_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert not [name for name in TRAIN_EXTRA if name in base]
    assert set(TRAIN_EXTRA) <= {
        dependency.split(">")[0].split("=")[0] for dependency in project["optional-dependencies"]["train"]
    }
    assert project["scripts"]["spamfilterd-train"] == "trainer.launch:main"


def test_trainer_without_the_train_extra_says_what_to_install():
    result = _run("sys.argv = ['spamfilterd-train', '--help']\nfrom trainer.launch import main\nmain()")
    assert result.returncode == 1
    assert "pip install 'spamfilterd[train]'" in result.stderr and "Traceback" not in result.stderr


def test_daemon_commands_import_without_the_training_libraries(tiny_checkpoint):
    code = (
        "import spamfilterd.cli, spamfilterd.serve, spamfilterd.pipe, spamfilterd.checkpoint\n"
        "from spamfilterd.classifier import SpamClassifier\n"
        f"classifier = SpamClassifier.load({str(tiny_checkpoint)!r}, device='cpu')\n"
        "print(classifier.classify('win a free prize now')[0])\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('trainer',) and sys.modules[n]))"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    verdict, trainer_modules = result.stdout.splitlines()
    assert verdict in ("ham", "unsure", "spam") and trainer_modules == "[]"
