"""What the targets share: the verified bundle, and no output without a registry identity."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopline.bundle import MANIFEST
from loopline.drivers.targets import TargetContext, get_target
from loopline.drivers.targets.context import export_bundle, image_command, open_context
from loopline.errors import ConfigError, IntegrityError, NotFound
from tests.drivers.targets.conftest import Registered


@pytest.mark.parametrize("name", ["container", "vm", "kubernetes"])
def test_nothing_renders_without_a_model_version(
    registered: Registered, tmp_path: Path, name: str
) -> None:
    cfg = registered.load()
    ctx = TargetContext(cfg, "production", cfg.environment("production"))  # no model
    with pytest.raises(ConfigError, match="no model version to serve; give NAME:VERSION"):
        get_target(name).render(ctx, tmp_path / name)


def test_the_context_holds_the_verified_bundle_of_the_version_asked(
    registered: Registered,
) -> None:
    with open_context(registered.load(), "staging", "trucks@candidate") as ctx:
        assert (ctx.model_name, ctx.model_version) == ("trucks", 3)
        assert ctx.bundle_sha256 == registered.bundle_sha256
        assert ctx.bundle_dir is not None and (ctx.bundle_dir / MANIFEST).is_file()
        folder = ctx.bundle_dir
        assert image_command(folder)[:4] == ["python", "-I", "-B", "-c"]
        assert "--host" not in image_command(folder) and "--port" not in image_command(folder)
    assert not folder.exists()  # a private folder, removed afterwards


def test_a_tampered_artifact_is_refused(registered: Registered, tmp_path: Path) -> None:
    stored = next((registered.root / ".loopline" / "artifacts").rglob(registered.bundle_sha256))
    stored.chmod(0o644)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        export_bundle(registered.load(), "trucks:3", tmp_path / "b")
    assert not (tmp_path / "b").exists()
    with pytest.raises(NotFound):
        export_bundle(registered.load(), "trucks:4", tmp_path / "c")


def test_a_bundle_without_a_serving_recipe_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the bundle has no Dockerfile"):
        image_command(tmp_path)
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCMD python serve.py\n")
    with pytest.raises(ConfigError, match="no exec-form CMD"):
        image_command(tmp_path)
