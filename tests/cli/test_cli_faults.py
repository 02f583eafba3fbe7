"""CLI faults: no project, markup in user text, run ids at 80 columns, datagen over a lake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.test_cli import invoke, one_line_error


# -- no project here ---------------------------------------------------------------------------
@pytest.fixture
def empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "not-a-project"
    folder.mkdir()
    monkeypatch.chdir(folder)
    for name in ("LOOPLINE_DB_URL", "LOOPLINE_ARTIFACTS_URL"):
        monkeypatch.delenv(name, raising=False)
    return folder


@pytest.mark.parametrize(
    "args",
    [
        ["models"],
        ["models", "--json"],
        ["models", "--all"],
        ["models", "show", "vehicles:1"],
        ["models", "alias", "vehicles:1", "production"],
        ["models", "archive", "vehicles:1"],
        ["models", "export", "vehicles:1", "--out", "ctx"],
        ["runs"],
        ["runs", "--json"],
        ["runs", "show", "x"],
        ["datasets"],
        ["audit"],
        ["evaluate", "vehicles:1"],
        ["serve", "vehicles:1"],
        ["serve", "vehicles@production", "--port", "0"],
    ],
)
def test_read_commands_outside_a_project_say_so_and_create_nothing(
    empty_folder: Path, args: list[str]
) -> None:
    code, out, err = invoke(*args)
    assert code == 1, out + err
    line = one_line_error(err)
    assert "no Loopline project here" in line and "loopline init" in line
    assert str(empty_folder) in line
    assert list(empty_folder.iterdir()) == []


def test_a_store_named_in_the_environment_is_a_project(
    empty_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOPLINE_DB_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    code, out, err = invoke("models", "--json")
    assert code == 0, err
    assert json.loads(out) == []
    assert list(empty_folder.iterdir()) == []


# -- user text is never markup -----------------------------------------------------------------
@pytest.mark.parametrize("odd", ["[x]", "[/x]", "[bold red]", "[link=file:///etc]a[/link]"])
def test_an_error_naming_a_path_prints_it_exactly(tmp_path: Path, odd: str) -> None:
    cfg = tmp_path / f"proj{odd}" / "loopline.yaml"
    code, _, err = invoke("build", "-c", str(cfg))
    assert code == 1
    assert one_line_error(err) == (
        f"error: config file not found: {cfg} (create one with `loopline init`)"
    )


def _store_with_runs(tmp_path: Path, errors: list[str]) -> tuple[Path, list[str]]:
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.pipeline.engine import new_run_id

    cfg = tmp_path / "loopline.yaml"
    cfg.write_text(f"store: {{metadata_url: 'sqlite:///{tmp_path / 'm.db'}'}}\n")
    store = MetadataStore(f"sqlite:///{tmp_path / 'm.db'}")
    ids = []
    for i, error in enumerate(errors):
        run_id = new_run_id()
        store.runs.create(run_id, pipeline="build", project="p", config={})
        store.runs.update(run_id, status="failed", error=error, model_name=f"m{i}")
        ids.append(run_id)
    store.close()
    return cfg, ids


def test_run_errors_with_markup_are_shown_literally(tmp_path: Path) -> None:
    text = "cannot read /data/[/x]/[bold]cam[1].png"
    cfg, (run_id, *_) = _store_with_runs(tmp_path, [text, "[/x]", "[b]z"])
    code, out, err = invoke("runs", "show", run_id, "-c", str(cfg))
    assert code == 0, err
    assert text in out
    code, out, err = invoke("runs", "-c", str(cfg))  # short errors: one table cell each
    assert code == 0, err
    assert "[/x]" in out and "[b]z" in out


def _run_cli(args: list[str], columns: int) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "dumb"}
    out = subprocess.run(
        [sys.executable, "-m", "loopline.cli.main", *args],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )  # fmt: skip
    return out.stdout


def test_runs_never_cut_the_run_id_at_80_columns(tmp_path: Path) -> None:
    long_error = "validation quarantined 31% of the records, over the limit of 20% " * 2
    cfg, ids = _store_with_runs(tmp_path, [long_error, "boom", ""])
    out = _run_cli(["runs", "-c", str(cfg)], 80)
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    for run_id in ids:
        assert any(run_id in line for line in lines), (run_id, out)


def test_models_never_cut_names_or_run_ids_at_80_columns(tmp_path: Path) -> None:
    from loopline.drivers.metadata.store import MetadataStore

    cfg, ids = _store_with_runs(tmp_path, ["", ""])
    store = MetadataStore(f"sqlite:///{tmp_path / 'm.db'}")
    names = ["vehicles", "vehicles-day-only-model"]
    for i, (name, run_id) in enumerate(zip(names, ids, strict=True)):
        store.models.register(
            name, bundle_uri="file:///b", bundle_sha256=f"{i:064x}", run_id=run_id,
            metrics={"accuracy": 0.9, "macro_f1": 0.9}, aliases=("candidate", "production"),
        )  # fmt: skip
    store.close()
    lines = _run_cli(["models", "-c", str(cfg)], 80).splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    for name, run_id in zip(names, ids, strict=True):
        assert any(name in line and run_id in line for line in lines), (name, run_id, lines)


# -- datagen over an existing lake ---------------------------------------------------------------
def test_datagen_refuses_an_existing_lake_unless_forced(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    code, _, err = invoke("datagen", "--out", str(lake), "--images", "12", "--seed", "1")
    assert code == 0, err
    before = {p: p.read_bytes() for p in lake.rglob("*") if p.is_file()}
    code, _, err = invoke("datagen", "--out", str(lake), "--images", "5", "--seed", "2")
    assert code == 1
    assert "already holds a lake" in one_line_error(err) and "--force" in err
    assert {p: p.read_bytes() for p in lake.rglob("*") if p.is_file()} == before
    code, out, err = invoke(
        "datagen", "--out", str(lake), "--images", "5", "--seed", "2", "--force", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["images"] == 5
    assert len(list((lake / "images").rglob("*.png"))) == 5
