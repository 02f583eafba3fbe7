"""The vm target: a systemd unit and an install script, whose steps run here into a fresh
virtualenv, after which the installed server answers a prediction as trucks:3."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from loopline.drivers.targets import render
from loopline.errors import ConfigError
from tests.deploy.conftest import free_port, image_bytes, wait_ready
from tests.drivers.targets.conftest import TOKEN_VAR, Registered

SECRET = "vm-test-token-value"
UNIT = "loopline-production.service"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}; fails on anything unexpected."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            assert current not in sections, f"line {number}: section {current} twice"
            sections[current] = []
            continue
        assert current is not None, f"line {number}: outside a section"
        key, sep, value = line.partition("=")
        assert sep and key and key == key.strip(), f"line {number}: not KEY=VALUE: {line!r}"
        sections[current].append((key, value))
    return sections


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    (value,) = [v for k, v in unit[section] if k == key]
    return value


def unit_environment(unit: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    out = {}
    for key, value in unit["Service"]:
        if key == "Environment":
            assert value.startswith('"') and value.endswith('"'), value
            name, _, val = value[1:-1].partition("=")
            out[name] = val
    return out


@pytest.fixture
def configured(registered: Registered, monkeypatch: pytest.MonkeyPatch) -> Registered:
    monkeypatch.setenv(TOKEN_VAR, SECRET)
    registered.write_config(
        {
            "production": {
                "port": free_port(),
                "token": "${" + TOKEN_VAR + "}",
                "serve": {"workers": 1, "log_predictions": False},
            }
        }
    )
    return registered


def test_the_unit_and_the_install_script(configured: Registered, tmp_path: Path) -> None:
    out = tmp_path / "out"
    render(configured.load(), "production", "trucks:3", "vm", out)
    unit = parse_unit((out / UNIT).read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "User") == "loopline"
    assert one(unit, "Service", "EnvironmentFile") == "/etc/loopline/production.env"
    assert one(unit, "Unit", "X-Loopline-Model") == "trucks:3"
    assert one(unit, "Unit", "X-Loopline-Bundle-Sha256") == configured.bundle_sha256
    bundle = f"/opt/loopline/production/bundles/{configured.bundle_sha256}"
    port = configured.load().environment("production").port
    start = shlex.split(one(unit, "Service", "ExecStart"))
    # The image's own start: verify the folder, then put it on sys.path and run the server.
    assert start[:4] == ["/opt/loopline/production/venv/bin/python", "-I", "-B", "-c"]
    assert f"run_path('{bundle}/verify-bundle.py')['verify']('{bundle}')" in start[4]
    assert "from loopline.deploy.server import main" in start[4]
    assert start[5:] == ["--bundle", bundle, "--host", "127.0.0.1", "--port", str(port)]
    assert shlex.split(one(unit, "Service", "ExecStartPre"))[-2:] == [
        f"{bundle}/verify-bundle.py",
        bundle,
    ]
    env = unit_environment(unit)
    assert env["LOOPLINE_MODEL_NAME"] == "trucks" and env["LOOPLINE_MODEL_VERSION"] == "3"
    assert env["LOOPLINE_SERVE_WORKERS"] == "1"
    assert "LOOPLINE_SERVE_TOKEN" not in env  # a secret: in the EnvironmentFile only
    script = (out / "install.sh").read_text()
    assert "set -euo pipefail" in script and os.access(out / "install.sh", os.X_OK)
    subprocess.run(["bash", "-n", str(out / "install.sh")], check=True)
    assert "LOOPLINE_SERVE_TOKEN=\n" in (out / "production.env.example").read_text()
    for path in out.iterdir():
        if path.is_file():
            assert SECRET not in path.read_text(), path.name


def test_a_root_service_user_or_an_odd_prefix_is_refused(
    configured: Registered, tmp_path: Path
) -> None:
    configured.write_config({"production": {"vm": {"user": "root"}}})
    with pytest.raises(ConfigError, match="non-root"):
        render(configured.load(), "production", "trucks:3", "vm", tmp_path / "a")
    configured.write_config({"production": {"vm": {"prefix": "opt/loop line"}}})
    with pytest.raises(ConfigError, match="absolute path"):
        render(configured.load(), "production", "trucks:3", "vm", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _install(out: Path, prefix: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(SKIP_SYSTEMD="1", LOOPLINE_PREFIX=str(prefix), LOOPLINE_PYTHON=sys.executable)
    r = subprocess.run(["bash", str(out / "install.sh")], env=env, capture_output=True,
                       text=True, timeout=1200)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_install_steps_in_a_fresh_virtualenv_then_a_prediction(
    configured: Registered, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    render(configured.load(), "production", "trucks:3", "vm", out)
    prefix = tmp_path / "host" / "opt"  # LOOPLINE_PREFIX: the unit follows it
    first = _install(out, prefix)
    assert "creating the virtualenv" in first and "copying the bundle" in first
    again = _install(out, prefix)  # idempotent: nothing redone
    assert "virtualenv" in again and "exists" in again and "is installed" in again

    text = (out / UNIT).read_text().replace("/opt/loopline/", f"{prefix}/")
    unit = parse_unit(text)
    venv_python = prefix / "production" / "venv" / "bin" / "python"
    assert shlex.split(one(unit, "Service", "ExecStart"))[0] == str(venv_python)
    if shutil.which("systemd-analyze"):
        (tmp_path / UNIT).write_text(text)
        r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / UNIT)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        complaints = [line for line in (r.stdout + r.stderr).splitlines() if UNIT in line]
        assert r.returncode == 0 and complaints == [], r.stdout + r.stderr

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPLINE_", "PYTHON"))}
    env.update(unit_environment(unit), LOOPLINE_SERVE_TOKEN=SECRET)  # + the EnvironmentFile
    home = tmp_path / "state"
    home.mkdir()
    pre = shlex.split(one(unit, "Service", "ExecStartPre"))
    subprocess.run(pre, env=env, cwd=home, check=True, timeout=120)
    proc = subprocess.Popen(shlex.split(one(unit, "Service", "ExecStart")), env=env, cwd=home,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        url = configured.load().environment("production").endpoint
        wait_ready(url, timeout=120, alive=lambda: proc.poll() is None)
        r = httpx.post(f"{url}/v1/models/trucks/predict", content=image_bytes(2),
                       headers={"Content-Type": "image/png"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert (r.json()["model"], r.json()["model_version"]) == ("trucks", 3)
    finally:
        proc.terminate()
        proc.wait(60)

    # A file slipped into the installed bundle stops the next start before any code runs,
    # and the next install replaces the bundle.
    installed = prefix / "production" / "bundles" / configured.bundle_sha256
    (installed / "sitecustomize.py").write_text("raise SystemExit('ran')\n")
    refused = subprocess.run(pre, env=env, cwd=home, capture_output=True, text=True)
    assert refused.returncode != 0 and "not in its manifest" in refused.stderr
    assert "copying the bundle" in _install(out, prefix)
    subprocess.run(pre, env=env, cwd=home, check=True, timeout=120)
