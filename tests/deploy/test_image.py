"""The serving image's build context, and (slow) the image's contents in a fresh virtualenv.

No container engine runs here, so the slow test does what the Dockerfile does: a fresh
virtualenv with only ``requirements-serve.txt`` installed (from the package index), the
bundle folder, and the Dockerfile's own ENV and CMD. Run it with ``LOOPLINE_SLOW=1``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest

from loopline.bundle import extract_bundle
from loopline.deploy import prestart
from loopline.deploy.image import image_context_files
from tests.deploy.conftest import (
    TOKEN,
    Project,
    image_command,
    predict_with_image_command,
)


def test_context_files() -> None:
    files = image_context_files()
    docker = files["Dockerfile"].decode()
    assert docker.startswith("# Serving image") and "FROM python:3.11-slim" in docker
    assert "USER loopline" in docker and "ENV PYTHONPATH" not in docker
    assert "EXPOSE 8080" in docker and "/v2/health/ready" in docker
    assert "pip install --no-cache-dir -r /bundle/requirements-serve.txt" in docker
    assert 'CMD ["python", "-I", "-B", "-c", \\\n' in docker
    assert '"--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8080"]' in docker
    # The folder is checked by the standard library alone, at build and before any import.
    assert "RUN python -I -B /bundle/verify-bundle.py /bundle\n" in docker
    check = "runpy.run_path('/bundle/verify-bundle.py')['verify']('/bundle'); "
    assert docker.index(check) < docker.index("sys.path.append('/bundle')")
    assert files["verify-bundle.py"] == Path(prestart.__file__).read_bytes()
    reqs = [r for r in files["requirements-serve.txt"].decode().splitlines()
            if not r.startswith("#")]  # fmt: skip
    pins = dict(line.split("==") for line in reqs)
    assert pins["onnxruntime"] == metadata.version("onnxruntime")
    assert pins["fastapi"] == metadata.version("fastapi")
    # Their own dependencies are pinned too, so no install floats to newer ones.
    assert pins["pydantic_core"] == metadata.version("pydantic_core")
    assert pins["anyio"] == metadata.version("anyio")  # starlette's
    assert pins["psycopg[binary]"] == metadata.version("psycopg")
    assert pins["psycopg-binary"] == metadata.version("psycopg-binary")  # its extra's
    assert not any(name.startswith(("torch", "onnx[", "optuna")) for name in pins)
    sources = [name for name in files if name.startswith("loopline/")]
    assert "loopline/deploy/server.py" in sources and "loopline/bundle.py" in sources
    assert "loopline/drivers/metadata/migrations/versions/0002_predictions.py" in sources
    assert not [s for s in sources if s.split("/")[1] in ("builder", "cli", "examples")]


def test_the_prestart_check_imports_only_the_standard_library() -> None:
    tree = ast.parse(Path(prestart.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}  # fmt: skip
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}  # fmt: skip
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def _bundle_folder(tmp_path: Path) -> Path:
    from loopline.bundle import write_bundle

    files = {name: f"{name}\n".encode() for name in ("model.onnx", "labels.json",
             "preprocess.json", "metadata.json", "loopline/__init__.py")}  # fmt: skip
    write_bundle(files, tmp_path / "b.tar")
    return extract_bundle(tmp_path / "b.tar", tmp_path / "bundle")


@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        (lambda b: (b / "labels.json").write_text("x"), "labels.json does not match its sha256"),
        (lambda b: (b / "labels.json").unlink(), "bundle file labels.json is missing"),
        (lambda b: (b / "x.py").symlink_to(b / "labels.json"), "entry x.py is a link"),
        (lambda b: (b / "d").symlink_to(b / "loopline"), "entry d is a link"),
        (lambda b: (b / "MANIFEST.json").write_text("{"), "MANIFEST.json is missing or unread"),
    ],
)
def test_the_prestart_check_refuses_a_spoilt_folder(
    tmp_path: Path, spoil: Callable[[Path], object], why: str
) -> None:
    folder = _bundle_folder(tmp_path)
    prestart.verify(str(folder))  # as exported: passes
    spoil(folder)
    with pytest.raises(SystemExit) as exc:
        prestart.verify(str(folder))
    assert str(exc.value.code).startswith("error: ") and why in str(exc.value.code)
    assert str(exc.value.code).endswith(f"; refusing to serve {folder}")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LOOPLINE_SLOW") != "1", reason="set LOOPLINE_SLOW=1")
def test_serving_requirements_alone_serve_the_bundle(
    fresh_project: Project, tmp_path: Path
) -> None:
    folder = extract_bundle(fresh_project.bundle_tar, tmp_path / "bundle")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "-r", str(folder / "requirements-serve.txt")],
        check=True, timeout=1200,
    )  # fmt: skip
    # The image's own start command (Dockerfile ENV and CMD, /bundle standing for the folder):
    # an unlisted file such as a __pycache__ would make it refuse the bundle.
    cmd, image_env = image_command(folder)
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LOOPLINE_SERVE_TOKEN": TOKEN,
        "LOOPLINE_MODEL_VERSION": "1",  # its registry identity, as `models export` prints
        **image_env,
    }
    probe = subprocess.run(
        [python, "-I", "-B", "-c", f"import sys; sys.path.append({str(folder)!r}); "
         "import importlib.util as u, loopline; "
         "print(loopline.__file__); print(u.find_spec('torch'))"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    where, torch_spec = probe.stdout.split()
    assert where == str(folder / "loopline" / "__init__.py") and torch_spec == "None"
    home = tmp_path / "home"
    home.mkdir()
    answer = predict_with_image_command(python, folder, env, home)
    assert answer["predictions"][0]["model_version"] == 1  # never version 0
    assert (home / ".loopline" / "loopline.db").exists()  # the log went to the default store
