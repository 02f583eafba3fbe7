"""A step's code version covers every module it runs: its own, what it imports, transitively."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from loopline.pipeline import Pipeline, Runner, Step, code


def test_the_train_step_covers_the_trainer_cnn_and_image_decoding() -> None:
    modules = code.closure(["loopline.builder.train"], ["loopline"])
    # Function-local imports count: `from loopline.builder import trainer` inside train(),
    # `from loopline.examples.vehicles.cnn import VehicleCNN` inside build_model().
    assert {
        "loopline.builder.trainer",
        "loopline.examples.vehicles.cnn",
        "loopline.builder.images",
        "loopline.bundle",  # decode_image
    } <= set(modules)
    assert all(modules.values())  # every one has a source hash
    assert not any(m.startswith(("torch", "numpy")) for m in modules)  # not followed


def test_hashing_imports_nothing() -> None:
    script = (
        "import sys; from loopline.builder.pipeline import build_pipeline; "
        "[s.code_version for s in build_pipeline()]; "
        "print('torch' in sys.modules, 'optuna' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]


def test_editing_a_loopline_module_a_step_imports_changes_its_code_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopline.builder.pipeline import build_pipeline

    steps = {s.name: s for s in build_pipeline()}
    before = {name: s.code_version for name, s in steps.items()}
    # An edited copy of trainer.py stands in for the installed one.
    edited = tmp_path / "trainer.py"
    original = code.module_file("loopline.builder.trainer")
    assert original is not None
    edited.write_text(original.read_text() + "\nEDITED = True\n")
    real = code.module_file
    monkeypatch.setattr(
        code,
        "module_file",
        lambda name: edited if name == "loopline.builder.trainer" else real(name),
    )
    after = {name: s.code_version for name, s in steps.items()}
    changed = {name for name in steps if after[name] != before[name]}
    assert changed == {"train", "evaluate", "package"}  # the steps that run the trainer


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    # A later edit in the same clock tick must still look different.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's package ``userpkg`` with a step whose helper lives in another module."""
    root = tmp_path / "src"
    _write(root / "userpkg" / "__init__.py", "")
    _write(
        root / "userpkg" / "steps.py",
        """
        def make(ctx):
            from userpkg import helpers  # a function-local import

            return helpers.value()
        """,
    )
    _write(root / "userpkg" / "helpers.py", "def value():\n    return 1\n")
    _write(root / "userpkg" / "unused.py", "X = 1\n")
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m.split(".")[0] == "userpkg"]:
        del sys.modules[name]


def test_editing_a_module_the_step_imports_reruns_it(tmp_path: Path, user_package: Path) -> None:
    steps = importlib.import_module("userpkg.steps")
    step = Step("make", steps.make, outputs=("value",))
    store = MetadataStore(f"sqlite:///{tmp_path / 'm.db'}")
    runner = Runner(store, ArtifactStore(str(tmp_path / "a")))

    def run() -> tuple[str, Any]:
        result = runner.run(Pipeline("p", [step]), {}, project="p")
        return result.steps[0].status, result.values["value"]

    assert run() == ("succeeded", 1)
    assert run() == ("cached", 1)
    first = step.code_version
    _write(user_package / "userpkg" / "unused.py", "X = 2\n")  # not imported: same code
    assert step.code_version == first and run() == ("cached", 1)
    _write(user_package / "userpkg" / "helpers.py", "def value():\n    return 2\n")
    importlib.reload(importlib.import_module("userpkg.helpers"))
    assert step.code_version != first
    assert run() == ("succeeded", 2)
    store.close()


def test_code_modules_add_a_user_module_by_params(user_package: Path) -> None:
    step = Step("s", _noop, code_modules=lambda params: [params["module"]])
    base = step.code_version_for({"module": "userpkg.unused"})
    assert step.code_version_for({"module": "userpkg.helpers"}) != base
    _write(user_package / "userpkg" / "unused.py", "X = 3\n")
    assert step.code_version_for({"module": "userpkg.unused"}) != base


def test_relative_imports_and_type_checking_blocks(tmp_path: Path, user_package: Path) -> None:
    _write(
        user_package / "userpkg" / "rel.py",
        """
        from typing import TYPE_CHECKING

        from . import helpers
        from .sub.deep import thing

        if TYPE_CHECKING:
            from userpkg import unused
        """,
    )
    _write(user_package / "userpkg" / "sub" / "__init__.py", "")
    _write(user_package / "userpkg" / "sub" / "deep.py", "thing = 1\n")
    modules = code.closure(["userpkg.rel"], ["userpkg"])
    assert set(modules) == {"userpkg.rel", "userpkg.helpers", "userpkg.sub.deep"}
    shutil.rmtree(user_package / "userpkg" / "sub")


def _noop(ctx: Any) -> None:
    return None


def _edited(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: str, text: str = "\nEDITED = 1\n"
) -> None:
    """Make ``module``'s source an edited copy of itself, as an edit of the installed file."""
    original = code.module_file(module)
    assert original is not None
    edited = tmp_path / f"{module}.py"
    edited.write_text(original.read_text() + text)
    real = code.module_file
    monkeypatch.setattr(code, "module_file", lambda name: edited if name == module else real(name))


@pytest.mark.parametrize(
    ("kind", "driver"),
    [("lake", "loopline.drivers.data.lake"), ("warehouse", "loopline.drivers.data.warehouse")],
)
def test_ingest_covers_the_source_driver_it_opens_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, driver: str
) -> None:
    from loopline.builder.pipeline import build_pipeline
    from loopline.config import parse_config

    source = {"kind": kind, "url": "sqlite://", "query": "SELECT 1"} if kind == "warehouse" else {}
    config = parse_config({"data": {"source": source}}, tmp_path).to_dict()
    steps = {s.name: s for s in build_pipeline()}
    params = {name: s.select_params(config) for name, s in steps.items()}
    before = {name: s.code_version_for(params[name]) for name, s in steps.items()}
    # The driver is imported by name from SOURCES, which no import scan reaches.
    _edited(monkeypatch, tmp_path, driver)
    after = {name: s.code_version_for(params[name]) for name, s in steps.items()}
    assert {name for name in steps if after[name] != before[name]} == {"ingest"}


def test_the_evaluate_step_does_not_cover_the_metadata_store() -> None:
    """``loopline evaluate``'s recording of dataset versions is not the evaluate step's code."""
    modules = code.closure(["loopline.builder.evaluate"], ["loopline"])
    assert "loopline.builder.trainer" in modules
    assert not [m for m in modules if m.startswith("loopline.drivers.metadata")]
    assert "loopline.builder.record" not in modules


@pytest.fixture
def user_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A project folder on sys.path: ``archmodels.net:Net`` uses ``archlayers.py`` beside
    the package, and yaml (installed, not the project's)."""
    root = tmp_path / "project"
    _write(root / "archmodels" / "__init__.py", "")
    _write(
        root / "archmodels" / "net.py",
        """
        import yaml

        from archlayers import Block


        class Net(Block):
            pass
        """,
    )
    _write(root / "archlayers.py", "class Block:\n    width = 1\n")
    _write(root / "archunused.py", "X = 1\n")
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m.split(".")[0] in ("archmodels", "archlayers")]:
        del sys.modules[name]


def test_a_user_architecture_covers_the_project_modules_it_imports(user_project: Path) -> None:
    from loopline.builder.pipeline import build_pipeline
    from loopline.builder.train import TrainParams

    train = build_pipeline().step("train")
    params = TrainParams(architecture="archmodels.net:Net", labels=["a", "b"])
    modules = code.closure(["archmodels.net"], ["archmodels"])
    assert {"archmodels.net", "archlayers"} <= set(modules)
    assert "yaml" not in modules and not any(m.startswith("yaml.") for m in modules)
    first = train.code_version_for(params)
    _write(user_project / "archunused.py", "X = 2\n")  # imported by nothing: same code
    assert train.code_version_for(params) == first
    _write(user_project / "archlayers.py", "class Block:\n    width = 2\n")
    assert train.code_version_for(params) != first


def test_an_edit_keeping_size_and_mtime_still_changes_the_code_version(
    user_package: Path,
) -> None:
    helpers = user_package / "userpkg" / "helpers.py"
    step = Step("s", _noop, code_modules=lambda params: ["userpkg.helpers"])
    first = step.code_version_for({})
    st = helpers.stat()
    helpers.write_text(helpers.read_text().replace("1", "2"))  # same size
    os.utime(helpers, ns=(st.st_atime_ns, st.st_mtime_ns))  # same clock tick
    assert helpers.stat().st_size == st.st_size
    assert step.code_version_for({}) != first
