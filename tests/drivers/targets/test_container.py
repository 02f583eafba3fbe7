"""The container target: a build context that bakes in the registry identity, and up/down
that use an engine where one runs and say plainly what to do where none does."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from loopline.bundle import MANIFEST, load_bundle
from loopline.drivers.targets import get_target, render
from loopline.drivers.targets.context import open_context
from tests.deploy.conftest import free_port, image_bytes, wait_ready
from tests.drivers.targets.conftest import TOKEN_VAR, Registered

SECRET = "container-test-token-value"
PG_PASSWORD = "pg-pass-word"


@pytest.fixture
def configured(registered: Registered, monkeypatch: pytest.MonkeyPatch) -> Registered:
    monkeypatch.setenv(TOKEN_VAR, SECRET)
    monkeypatch.setenv("LOOPLINE_TARGETS_TEST_PG", PG_PASSWORD)
    registered.write_config(
        {
            "production": {
                "port": 18080,
                "token": "${" + TOKEN_VAR + "}",
                "serve": {"workers": 1},
                "metadata_url": "postgresql+psycopg://loop:${LOOPLINE_TARGETS_TEST_PG}@db/loop",
                "container": {"replicas": 2},
            }
        }
    )
    return registered


def _registered_manifest(registered: Registered, version: int) -> bytes:
    with tarfile.open(registered.root / f"bundle-{version}.tar") as tar:
        src = tar.extractfile(MANIFEST)
        assert src is not None
        return src.read()


def test_render_writes_the_bundle_unchanged_and_a_dockerfile_with_its_identity(
    configured: Registered, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    files = render(configured.load(), "production", "trucks:3", "container", out)
    assert {p.relative_to(out).parts[0] for p in files} == {"bundle", "Dockerfile", "run.sh"}
    bundle = load_bundle(out / "bundle")  # exactly the files of its manifest, unchanged
    assert (out / "bundle" / MANIFEST).read_bytes() == _registered_manifest(configured, 3)
    assert bundle.metadata["name"] == "vehicles"  # the registry name is only in the image
    ours = (out / "Dockerfile").read_text().splitlines()
    recipe = (out / "bundle" / "Dockerfile").read_text().splitlines()
    added = list(ours)
    for line in recipe:  # the bundle's recipe, in order, with lines added
        added = added[added.index(line) + 1 :] if line in added else pytest.fail(line)
    extra = [line for line in ours if line not in recipe]
    assert all(
        line.startswith(("#", "LABEL ", "      loopline.dev/", "ENV LOOPLINE_MODEL_"))
        for line in extra
    ), extra
    assert 'ENV LOOPLINE_MODEL_NAME="trucks" LOOPLINE_MODEL_VERSION="3"' in ours
    assert f'loopline.dev/bundle-sha256="{configured.bundle_sha256}"' in "\n".join(ours)
    assert "docker build -f Dockerfile -t loopline-trucks:3 bundle" in (out / "run.sh").read_text()
    assert SECRET not in (out / "run.sh").read_text()
    assert PG_PASSWORD not in (out / "run.sh").read_text()


def test_a_server_started_as_the_image_starts_reports_trucks_3(
    configured: Registered, tmp_path: Path, image_python: str
) -> None:
    """The Dockerfile's ENV and CMD run here (no engine): /bundle is the rendered bundle,
    `python` sees the serving dependencies but not the installed Loopline, as in the image."""
    out = tmp_path / "out"
    render(configured.load(), "production", "trucks:3", "container", out)
    text = (out / "Dockerfile").read_text().replace("\\\n", " ")
    image_env: dict[str, str] = {}
    cmd: list[str] = []
    for line in text.splitlines():
        if line.startswith("ENV "):
            image_env.update(pair.split("=", 1) for pair in shlex.split(line[4:]))
        elif line.startswith("CMD "):
            cmd = json.loads(line[4:])
    for check in [line for line in text.splitlines() if line.startswith("RUN python ")]:
        args = [a.replace("/bundle", str(out / "bundle")) for a in shlex.split(check[4:])]
        subprocess.run([image_python, *args[1:]], check=True)  # the image's build check
    assert cmd[0] == "python" and cmd[-4:] == ["--host", "0.0.0.0", "--port", "8080"]
    port = free_port()
    args = [a.replace("/bundle", str(out / "bundle")) for a in cmd[1:-4]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPLINE_", "PYTHON"))}
    env.update(image_env)
    proc = subprocess.Popen(
        [image_python, *args, "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=120, alive=lambda: proc.poll() is None)
        r = httpx.post(f"{url}/v1/models/trucks/predict", content=image_bytes(1),
                       headers={"Content-Type": "image/png"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert (r.json()["model"], r.json()["model_version"]) == ("trucks", 3)
    finally:
        proc.terminate()
        proc.wait(60)


def _no_engine_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_up_without_an_engine_says_so_and_prints_the_exact_commands(
    configured: Registered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_engine_path(tmp_path, monkeypatch)
    target = get_target("container")
    with open_context(configured.load(), "production", "trucks:3") as ctx:
        outcome = target.up(ctx)
        down = target.down(ctx)
        status = target.status(ctx)
    where = configured.root / ".loopline" / "targets" / "production" / "container"
    assert outcome.ok is False
    assert outcome.message.startswith(
        "no container engine was found (docker is not installed; podman is not installed)"
    )
    assert str(where) in outcome.message
    assert load_bundle(where / "bundle").labels  # the build context is there, verified
    assert outcome.commands == [
        f'export LOOPLINE_SERVE_TOKEN="${{{TOKEN_VAR}}}"',
        'export LOOPLINE_DB_URL="postgresql+psycopg://loop:${LOOPLINE_TARGETS_TEST_PG}@db/loop"',
        f"docker build -f {where}/Dockerfile -t loopline-trucks:3 {where}/bundle",
        "docker rm -f loopline-fleet-production-0 >/dev/null 2>&1 || true",
        "docker run --detach --name loopline-fleet-production-0 --restart unless-stopped "
        "--publish 127.0.0.1:18080:8080 --label loopline.dev/environment=production "
        "--label loopline.dev/project=fleet --env LOOPLINE_SERVE_TOKEN --env LOOPLINE_DB_URL "
        "--env LOOPLINE_SERVE_WORKERS=1 loopline-trucks:3",
        "docker rm -f loopline-fleet-production-1 >/dev/null 2>&1 || true",
        "docker run --detach --name loopline-fleet-production-1 --restart unless-stopped "
        "--publish 127.0.0.1:18081:8080 --label loopline.dev/environment=production "
        "--label loopline.dev/project=fleet --env LOOPLINE_SERVE_TOKEN --env LOOPLINE_DB_URL "
        "--env LOOPLINE_SERVE_WORKERS=1 loopline-trucks:3",
    ]
    shown = " ".join([outcome.message, *outcome.commands, json.dumps(outcome.details)])
    assert SECRET not in shown and PG_PASSWORD not in shown
    assert down.ok is False and down.message.startswith("no container engine was found")
    assert "label=loopline.dev/environment=production" in down.commands[0]
    assert status["engine"] is None and "no container engine was found" in status["message"]


FAKE_ENGINE = """#!{python}
# A stand-in for docker: no container engine runs on this machine (its docker CLI has no
# daemon), so this records what the target asks of an engine, and with what environment.
import json, os, sys
with open(os.environ["FAKE_ENGINE_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "token": os.environ.get("LOOPLINE_SERVE_TOKEN"),
                        "db": os.environ.get("LOOPLINE_DB_URL")}}) + "\\n")
if sys.argv[1] == "info" and os.environ.get("FAKE_ENGINE_DAEMON") == "down":
    sys.exit("Cannot connect to the Docker daemon at unix:///var/run/docker.sock.")
if sys.argv[1] == "ps":
    print("loopline-fleet-production-0\\nloopline-fleet-production-7")
"""


def _fake_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    engine = bin_dir / "docker"
    engine.write_text(FAKE_ENGINE.format(python=sys.executable))
    engine.chmod(0o755)
    log = tmp_path / "engine.log"
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(log))
    return log


def _calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_up_builds_and_runs_with_secrets_in_the_environment_only(
    configured: Registered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _fake_engine(tmp_path, monkeypatch)
    with open_context(configured.load(), "production", "trucks:3") as ctx:
        outcome = get_target("container").up(ctx)
    assert outcome.ok, outcome.message
    where = configured.root / ".loopline" / "targets" / "production" / "container"
    calls = _calls(log)
    argv = [c["argv"] for c in calls]
    assert argv[0] == ["info"]
    assert argv[1] == ["build", "-f", f"{where}/Dockerfile", "-t", "loopline-trucks:3",
                       f"{where}/bundle"]  # fmt: skip
    runs = [c for c in calls if c["argv"][0] == "run"]
    assert [r["argv"][r["argv"].index("--name") + 1] for r in runs] == [
        "loopline-fleet-production-0",
        "loopline-fleet-production-1",
    ]
    for run in runs:
        assert run["argv"][run["argv"].index("--restart") + 1] == "unless-stopped"
        assert "LOOPLINE_SERVE_TOKEN" in run["argv"] and "LOOPLINE_DB_URL" in run["argv"]
        assert run["token"] == SECRET  # handed over in the environment
        assert run["db"] == f"postgresql+psycopg://loop:{PG_PASSWORD}@db/loop"
    assert ["rm", "-f", "loopline-fleet-production-7"] in argv  # a surplus replica
    for call in calls:
        assert SECRET not in " ".join(call["argv"]) and PG_PASSWORD not in " ".join(call["argv"])
    assert outcome.details["containers"] == [
        "loopline-fleet-production-0",
        "loopline-fleet-production-1",
    ]
    assert SECRET not in outcome.message


def test_an_engine_without_its_daemon_counts_as_none(
    configured: Registered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _fake_engine(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_ENGINE_DAEMON", "down")
    configured.write_config({"production": {"container": {"engine": "docker"}}})
    with open_context(configured.load(), "production", "trucks:3") as ctx:
        outcome = get_target("container").up(ctx)
    assert outcome.ok is False
    assert outcome.message.startswith(
        "no container engine was found (docker is installed but its engine does not answer: "
        "Cannot connect to the Docker daemon"
    )
    assert [c["argv"] for c in _calls(log)] == [["info"]]  # nothing built, nothing run
    assert outcome.commands[0].startswith("docker build -f ")
