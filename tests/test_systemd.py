"""The systemd units: the settings the daemon relies on, `systemd-analyze verify`, and the exposure score.

The systemd-analyze checks skip cleanly where the tool is absent (`apt-get install systemd`);
they need no running systemd.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spamfilterd.cli import main
from spamfilterd.config import SmtpConfig
from spamfilterd.serve import DRAIN_MARGIN_S

UNITS = Path(__file__).resolve().parents[1] / "systemd"
SERVICE = UNITS / "spamfilterd.service"
MAX_EXPOSURE = 4.0
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def settings(unit: Path) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file; keys may repeat, as systemd allows."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_service_is_a_notify_daemon_that_reloads_and_restarts():
    unit = settings(SERVICE)
    assert unit["Type"] == ["notify"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == ["78"]  # a bad config does not fix itself
    assert unit["StateDirectory"] == ["spamfilterd"]
    assert unit["ConfigurationDirectory"] == ["spamfilterd"]
    assert unit["RuntimeDirectory"] == ["spamfilterd"]  # /run/spamfilterd: the spamd door's socket
    assert unit["DynamicUser"] == ["yes"]
    # Stop must outlast the drain: the per-message deadline plus the margin.
    assert seconds(unit["TimeoutStopSec"][0]) > SmtpConfig().data_timeout + DRAIN_MARGIN_S


def test_exec_start_runs_the_serve_command_with_options_that_exist():
    argv = shlex.split(settings(SERVICE)["ExecStart"][0])
    assert argv[0] == "/opt/spamfilterd/bin/spamfilterd"
    assert argv[1] == "serve"
    options = {opt for param in main.get_command(None, "serve").params for opt in param.opts}
    assert {arg for arg in argv[2:] if arg.startswith("--")} <= options


def test_service_is_hardened():
    unit = settings(SERVICE)
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "PrivateUsers": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "IPAddressDeny": "any",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert "@system-service" in unit["SystemCallFilter"]
    assert set(unit["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}


def _verifiable_copies(tmp_path: Path) -> list[Path]:
    """verify insists that ExecStart binaries exist: point the copies at /bin/true."""
    copies = []
    for unit in sorted([*UNITS.glob("*.service"), *UNITS.glob("*.timer")]):
        text = re.sub(r"/opt/spamfilterd/bin/\S+", "/bin/true", unit.read_text())
        copy = tmp_path / unit.name
        copy.write_text(text)
        copies.append(copy)
    return copies


@needs_analyze
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    copies = _verifiable_copies(tmp_path)
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", *map(str, copies)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "spamfilterd" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


@needs_analyze
def test_exposure_score_is_below_4():
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(SERVICE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr:
        pytest.skip("systemd-analyze is older than v250 (no --offline)")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) < MAX_EXPOSURE


FAKE_TRAIN = """#!/bin/sh
# Stands in for spamfilterd-train: `evaluate` prints canned metrics, training makes --out.
if [ "$1" = evaluate ]; then
    case "$3" in */model) cat "$FAKE/current.json" ;; *) cat "$FAKE/candidate.json" ;; esac
    exit 0
fi
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
mkdir -p "$out" && echo '{}' > "$out/model.json"
"""


def _retrain(tmp_path: Path, candidate: str, current: str = "{}") -> subprocess.CompletedProcess:
    fake, state = tmp_path / "bin", tmp_path / "state"
    fake.mkdir(exist_ok=True)
    (fake / "spamfilterd-train").write_text(FAKE_TRAIN)
    (fake / "spamfilterd-train").chmod(0o755)
    if not (fake / "python").exists():
        (fake / "python").symlink_to(sys.executable)
    (fake / "candidate.json").write_text(candidate)
    (fake / "current.json").write_text(current)
    env = {
        "PATH": "/usr/bin:/bin",
        "STATE_DIRECTORY": str(state),
        "SPAMFILTERD_BIN": str(fake),
        "FAKE": str(fake),
    }
    return subprocess.run(
        ["/bin/sh", str(UNITS / "spamfilterd-retrain.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_retrain_promotes_a_good_candidate_and_keeps_the_model_when_the_gate_fails(tmp_path):
    good = '{"accuracy": 0.97, "fpr": 0.001, "n": 400}'
    first = _retrain(tmp_path, good)
    assert first.returncode == 0, first.stdout + first.stderr
    model = tmp_path / "state" / "model"
    promoted = model.resolve()
    assert (promoted / "model.json").is_file() and "promoted" in first.stdout

    time.sleep(1.1)  # checkpoints are named by the second
    worse = _retrain(tmp_path, '{"accuracy": 0.99, "fpr": 0.02, "n": 400}', current=good)
    assert worse.returncode == 0, worse.stdout + worse.stderr
    assert "rejected" in worse.stdout
    assert model.resolve() == promoted
    assert len(list((tmp_path / "state" / "models").glob("*.rejected"))) == 1


def test_retrain_service_shares_the_user_and_state_and_reloads_the_proxy():
    retrain, service = settings(UNITS / "spamfilterd-retrain.service"), settings(SERVICE)
    for key in ("DynamicUser", "User", "StateDirectory"):
        assert retrain[key] == service[key], key
    assert retrain["ExecStartPost"] == ["+/bin/systemctl try-reload-or-restart spamfilterd.service"]
    assert settings(UNITS / "spamfilterd-retrain.timer")["Persistent"] == ["true"]
