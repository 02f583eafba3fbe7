"""`loopline models export`: a registered bundle, verified, as a container build context."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopline.bundle import load_bundle
from loopline.cli.main import app
from loopline.errors import IntegrityError
from tests.deploy.conftest import Project, image_command


def test_export_writes_a_verified_build_context(fresh_project: Project, tmp_path: Path) -> None:
    out = tmp_path / "context"
    r = CliRunner().invoke(
        app, ["models", "export", "vehicles:1", "--out", str(out), "-c", str(fresh_project.config)]
    )
    assert r.exit_code == 0, r.stderr
    assert "docker build -t vehicles:1" in r.stdout
    bundle = load_bundle(out)  # verifies every file against the manifest
    assert bundle.labels == ["car", "van", "truck", "bus", "motorcycle"]
    dockerfile = (out / "Dockerfile").read_text()
    assert "loopline.deploy.server" in dockerfile and "--bundle" in dockerfile
    assert "torch" not in (out / "requirements-serve.txt").read_text()

    again = CliRunner().invoke(
        app, ["models", "export", "vehicles:1", "--out", str(out), "-c", str(fresh_project.config)]
    )
    assert again.exit_code == 1 and "not an empty folder" in again.stderr


def test_export_refuses_a_tampered_artifact(fresh_project: Project, tmp_path: Path) -> None:
    store_file = next(
        (fresh_project.root / ".loopline" / "artifacts" / "sha256").rglob(
            fresh_project.bundle_sha256
        )
    )
    store_file.chmod(0o644)
    data = bytearray(store_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    store_file.write_bytes(bytes(data))
    out = tmp_path / "context"
    r = CliRunner().invoke(
        app, ["models", "export", "vehicles:1", "--out", str(out), "-c", str(fresh_project.config)]
    )
    assert r.exit_code == 1 and "tampered" in r.stderr
    assert not out.exists()


def _export(project: Project, out: Path) -> Path:
    r = CliRunner().invoke(
        app, ["models", "export", "vehicles:1", "--out", str(out), "-c", str(project.config)]
    )
    assert r.exit_code == 0, r.stderr
    return out


def test_a_file_added_to_an_exported_bundle_is_refused_and_never_runs(
    fresh_project: Project, tmp_path: Path
) -> None:
    out = _export(fresh_project, tmp_path / "context")
    marker = tmp_path / "sitecustomize-ran"
    (out / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(IntegrityError, match="sitecustomize.py is not in its manifest"):
        load_bundle(out)
    served = subprocess.run(
        [sys.executable, "-m", "loopline.cli.main", "serve", "--bundle", str(out),
         "--no-log", "--port", "0"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert served.returncode == 1
    assert served.stderr.startswith("error: refusing to serve bundle")
    assert "sitecustomize.py is not in its manifest" in served.stderr
    # The image's own start command, as the Dockerfile gives it (its ENV included).
    cmd, env = image_command(out)
    home = tmp_path / "home"
    home.mkdir()
    image = subprocess.run(
        [sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]],
        capture_output=True, text=True, timeout=120, cwd=home,
        env={**os.environ, **env, "PYTHONPATH": str(out)},
    )  # fmt: skip
    assert image.returncode == 1, image.stderr
    assert "sitecustomize.py is not in its manifest" in image.stderr
    assert not marker.exists(), "a file outside the manifest ran at start-up"


def test_an_extra_migration_in_an_exported_bundle_is_refused(
    fresh_project: Project, tmp_path: Path
) -> None:
    out = _export(fresh_project, tmp_path / "context")
    versions = out / "loopline" / "drivers" / "metadata" / "migrations" / "versions"
    assert versions.is_dir()
    (versions / "0099_evil.py").write_text("revision = '0099'\ndown_revision = '0002'\n")
    with pytest.raises(IntegrityError, match="0099_evil.py is not in its manifest"):
        load_bundle(out)
