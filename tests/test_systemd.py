"""The systemd units: the settings the daemon relies on, `systemd-analyze verify`, and the exposure score.

The systemd-analyze checks skip cleanly where the tool is absent (`apt-get install systemd`);
they need no running systemd.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
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
    assert unit["DynamicUser"] == ["yes"]
    # Stop must outlast the drain: the per-message deadline plus the margin.
    assert seconds(unit["TimeoutStopSec"][0]) > SmtpConfig().data_timeout + DRAIN_MARGIN_S


def test_exec_start_runs_the_serve_command_with_options_that_exist():
    argv = shlex.split(settings(SERVICE)["ExecStart"][0])
    assert argv[0] == "/opt/spamfilterd/bin/spamfilterd"
    assert argv[1] == "serve"
    options = {opt for param in main.commands["serve"].params for opt in param.opts}
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
    for unit in sorted(UNITS.glob("spamfilterd*.*")):
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
