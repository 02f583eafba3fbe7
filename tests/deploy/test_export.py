"""`loopline models export`: a registered bundle, verified, as a container build context."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from loopline.bundle import load_bundle
from loopline.cli.main import app
from tests.deploy.conftest import Project


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
