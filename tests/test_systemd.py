"""The systemd units pass ``systemd-analyze verify`` and carry the hardening; the install script
stages a whole installation, keeps an operator's config, and takes it all away again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ghubai.config import ROLES
from conftest import run_ghubai

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
INSTALL = REPO / "scripts" / "install-systemd.sh"
HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "CapabilityBoundingSet": "", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service",
}


def settings(unit: Path) -> dict[str, str]:
    lines = [line.partition("=") for line in unit.read_text().splitlines() if "=" in line and line[0] != "#"]
    return {key: value for key, _, value in lines}


@pytest.mark.parametrize("role", ROLES)
def test_unit_is_a_hardened_notify_service(role: str) -> None:
    unit = settings(UNITS / f"ghubai-{role}.service")
    assert unit["Type"] == "notify" and unit["Restart"] == "on-failure" and unit["User"] == "ghubai"
    assert unit["ExecStart"] == f"/opt/ghubai/bin/ghubai {role} --config /etc/ghubai/{role}.toml --log-format json"
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID" and unit["WatchdogSec"]
    assert {key: unit.get(key) for key in HARDENING} == HARDENING
    assert "ReadWritePaths" not in unit  # no role writes to disk
    if role != "registry":  # a connection per client, or two per request at a worker of 1024 slots
        assert unit["LimitNOFILE"] == "65536"
    if role == "worker":  # ready once a hub welcomed it: waiting for hubs is no failed start
        assert unit["TimeoutStartSec"] == "infinity"


def test_systemd_analyze_verifies_every_unit(tmp_path: Path) -> None:
    """Verified as installed, except that ExecStart points at this environment's ``ghubai`` (verify
    insists that the program exists)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (Debian package systemd; .ci/run installs it)"
    program = Path(sys.executable).parent / "ghubai"
    assert program.exists(), f"{program}: install the project (pip install -e .) first"
    for role in ROLES:
        text = (UNITS / f"ghubai-{role}.service").read_text()
        (tmp_path / f"ghubai-{role}.service").write_text(text.replace("/opt/ghubai/bin/ghubai", str(program)))
    result = subprocess.run([analyze, "verify", *sorted(map(str, tmp_path.iterdir()))],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_install_script_stages_keeps_configs_and_uninstalls(tmp_path: Path) -> None:
    root, calls = tmp_path / "root", tmp_path / "systemctl.log"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    systemctl.chmod(0o755)
    env = {**os.environ, "GHUBAI_ROOT": str(root), "SYSTEMCTL": str(systemctl), "PYTHON": sys.executable}

    def script(*args: str) -> str:
        done = subprocess.run([str(INSTALL), *args], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    etc = root / "etc/ghubai"
    etc.mkdir(parents=True)
    (etc / "hub.toml").write_text('listen = "0.0.0.0:7197"\n')  # the operator's own: must survive
    out = script("hub", "worker")
    assert f"kept {etc}/hub.toml" in out and f"wrote {etc}/worker.toml" in out
    assert (etc / "hub.toml").read_text() == 'listen = "0.0.0.0:7197"\n'
    assert [oct(path.stat().st_mode & 0o7777) for path in (etc, etc / "hub.toml", etc / "worker.toml")] == \
        ["0o2750", "0o640", "0o640"]  # the operator's own file too: it holds secrets
    assert run_ghubai("check", str(etc / "worker.toml")).returncode == 0
    assert subprocess.run([str(root / "opt/ghubai/bin/ghubai"), "--version"], capture_output=True).returncode == 0
    assert os.readlink(root / "usr/local/bin/ghubai") == str(root / "opt/ghubai/bin/ghubai")  # on the PATH
    for role in ("hub", "worker"):
        assert (root / f"etc/systemd/system/ghubai-{role}.service").read_bytes() == \
            (UNITS / f"ghubai-{role}.service").read_bytes()
    assert "enable --now --no-block ghubai-worker.service" in calls.read_text()
    script("hub")  # again: an upgrade, which restarts what runs
    assert calls.read_text().count("try-restart --no-block ghubai-*.service") == 2
    # a venv of another Python in the same folder (Debian's python3.10 beside python3.11) is made again
    # (regression, hunt: it was kept, so neither PYTHON=python3.11 nor a second run could replace it)
    venv_python = root / "opt/ghubai/bin/python"
    venv_python.unlink()
    venv_python.write_text("#!/bin/sh\necho /usr/bin/python3.10 '(3, 10)'\n")
    venv_python.chmod(0o755)
    script("hub")
    done = subprocess.run([str(venv_python), "-c", "import sys, ghubai; print(sys.version_info[:2])"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == str(sys.version_info[:2]), done

    script("--uninstall", "worker")
    assert not (root / "etc/systemd/system/ghubai-worker.service").exists()
    assert (root / "opt/ghubai/bin/ghubai").exists()  # the hub still needs it
    script("--uninstall", "hub")
    assert not (root / "opt/ghubai").exists() and (etc / "hub.toml").exists()
    assert not (root / "usr/local/bin/ghubai").is_symlink()
    assert "disable --now ghubai-hub.service" in calls.read_text()
    script("--purge", "hub")
    assert not etc.exists()
