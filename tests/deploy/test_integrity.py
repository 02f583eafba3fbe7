"""A bundle that does not match its sha256 (registered digest or manifest) is never served."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loopline.bundle import extract_bundle
from loopline.deploy.server import ModelSource, load_model
from loopline.deploy.settings import ServeSettings
from loopline.errors import IntegrityError
from tests.deploy.conftest import Project


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def serve_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loopline.deploy.server", *args, "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_tampered_model_in_an_extracted_bundle_is_refused(fresh_project: Project) -> None:
    folder = extract_bundle(fresh_project.bundle_tar, fresh_project.root / "extracted")
    settings = ServeSettings(log_predictions=False)
    # Intact: loads, as the version the project's registry holds with its sha256.
    served, _ = load_model(ModelSource(bundle=folder, config=fresh_project.config), settings)
    assert (served.name, served.version) == ("vehicles", 1)
    flip_byte(folder / "model.onnx", 200)
    with pytest.raises(IntegrityError, match="model.onnx does not match its sha256"):
        load_model(ModelSource(bundle=folder), settings)
    out = serve_cli("--bundle", str(folder), "--no-log")
    assert out.returncode == 1
    assert out.stderr.startswith("error: refusing to serve bundle")
    assert "model.onnx does not match its sha256" in out.stderr


def test_tampered_tar_in_the_artifact_store_is_refused(fresh_project: Project) -> None:
    stored = next((fresh_project.root / ".loopline" / "artifacts" / "sha256").rglob("*"))
    while stored.is_dir():
        stored = next(stored.iterdir())
    flip_byte(stored, 5000)
    with pytest.raises(IntegrityError, match="corrupt or tampered"):
        load_model(ModelSource(ref="vehicles:1", config=fresh_project.config), ServeSettings())
    out = serve_cli("vehicles@candidate", "--config", str(fresh_project.config))
    assert out.returncode == 1
    assert "error: refusing to serve vehicles:1" in out.stderr and "tampered" in out.stderr


def test_unknown_model_is_a_clear_error(fresh_project: Project) -> None:
    out = serve_cli("vehicles:7", "--config", str(fresh_project.config))
    assert out.returncode == 1
    assert out.stderr.strip() == "error: no model version vehicles:7 (see `loopline models`)"
