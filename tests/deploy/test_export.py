"""`loopline models export`: a registered bundle, verified, as a container build context."""

from __future__ import annotations

import importlib.util
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopline.bundle import load_bundle
from loopline.cli.main import app
from loopline.deploy import prestart
from loopline.errors import IntegrityError
from tests.deploy.conftest import (
    Project,
    image_build_checks,
    image_command,
    predict_with_image_command,
)


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


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LOOPLINE_"))}


def test_the_image_command_checks_then_serves_the_bundle_s_own_source(
    fresh_project: Project, tmp_path: Path, image_python: str
) -> None:
    out = _export(fresh_project, tmp_path / "context")
    assert (out / "verify-bundle.py").read_bytes() == Path(prestart.__file__).read_bytes()
    for check in image_build_checks(out):  # the build's own check passes
        assert check[0] == "python", check
        subprocess.run([image_python, *check[1:]], check=True, env=_clean_env(), timeout=60)
    home = tmp_path / "home"
    home.mkdir()
    # A bare bundle is told its registry identity (`loopline models export` prints how).
    answer = predict_with_image_command(
        image_python, out, _clean_env(), home, "--no-log", "--model-version", "1"
    )
    assert answer["model_version"] == 1
    # The server ran from the bundle's copy of Loopline, as it does in the image.
    where = subprocess.run(
        [image_python, "-I", "-B", "-c",
         f"import sys; sys.path.append({str(out)!r}); import loopline; print(loopline.__file__)"],
        capture_output=True, text=True, check=True, env=_clean_env(),
    )  # fmt: skip
    assert where.stdout.strip() == str(out / "loopline" / "__init__.py")


def _plant(out: Path, kind: str, code: str) -> str:
    """Put a file that Python would run in place of a listed module; return its name."""
    if kind == "package":  # a package shadows the module of the same name
        package = out / "loopline" / "deploy" / "server"
        package.mkdir()
        (package / "__init__.py").write_text(code)
        return "loopline/deploy/server/__init__.py"
    # Bytecode that Python takes without looking at the source (an unchecked-hash .pyc).
    source = out / "loopline" / "__init__.py"
    evil = out.parent / "evil.py"
    evil.write_text(code)
    pyc = Path(importlib.util.cache_from_source(str(source)))
    py_compile.compile(str(evil), cfile=str(pyc), dfile=str(source), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)  # fmt: skip
    return pyc.relative_to(out).as_posix()


@pytest.mark.parametrize("kind", ["package", "bytecode"])
def test_a_file_dropped_among_the_bundle_s_modules_never_runs(
    fresh_project: Project, tmp_path: Path, image_python: str, kind: str
) -> None:
    out = _export(fresh_project, tmp_path / "context")
    marker = tmp_path / "planted-code-ran"
    name = _plant(out, kind, f"open({str(marker)!r}, 'w').write('ran')\n")
    for check in image_build_checks(out):  # the image build fails...
        built = subprocess.run([image_python, *check[1:]], capture_output=True, text=True,
                               env=_clean_env(), timeout=60)  # fmt: skip
        assert built.returncode == 1
        assert built.stderr == (
            f"error: bundle file {name} is not in its manifest; refusing to serve {out}\n"
        )
    cmd, env = image_command(out)  # ...and so does a start on such a folder
    started = subprocess.run(
        [image_python, *cmd[1:]], capture_output=True, text=True, timeout=120,
        cwd=tmp_path, env={**_clean_env(), **env},
    )  # fmt: skip
    assert not marker.exists(), "a file outside the manifest ran before the check"
    assert started.returncode == 1, started.stderr
    assert f"bundle file {name} is not in its manifest" in started.stderr
