"""A password in a URL is never printed or stored: build output, runs, steps, dataset versions,
lineage and every ``--json`` listing show it masked, with a real PostgreSQL warehouse (and
metadata store) whose trust authentication accepts any password.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from tests.cli.test_cli import invoke

TRAIN = """\
validate: {{max_quarantine_share: {quarantine}}}
train:
  input_size: 32
  depth: 2
  width: 8
  epochs: 1
  batch_size: 32
  threads: 1
  search: {{space: {{lr: [0.01]}}}}
gate:
  rules: ["macro_precision >= 0.0"]
"""


def with_password(url: str, password: str) -> str:
    return make_url(url).set(password=password).render_as_string(hide_password=False)


@pytest.fixture
def warehouse(pg_schema_url: str, tiny_lake: Path) -> Iterator[str]:
    """The tiny lake's manifest as table ``wh_records`` in a fresh PostgreSQL schema."""
    records = pd.read_csv(tiny_lake / "manifest.csv", dtype=str, keep_default_na=False)
    engine = create_engine(pg_schema_url)
    with engine.begin() as conn:
        records.to_sql("wh_records", conn, index=False)
    engine.dispose()
    yield pg_schema_url


def secret() -> str:
    return f"Hunter2-{uuid.uuid4().hex[:10]}"


def forms(password: str) -> list[str]:
    return [password, quote(password, safe="")]


def write_config(
    path: Path, *, warehouse_url: str, metadata_url: str, lake: Path, quarantine: float
) -> Path:
    path.write_text(
        "project: tiny\nmodel: {name: tiny}\n"
        f"store: {{metadata_url: '{metadata_url}', artifacts_url: '{path.parent / 'artifacts'}'}}\n"
        "data:\n  source:\n    kind: warehouse\n"
        f"    url: '{warehouse_url}'\n"
        "    query: SELECT * FROM wh_records ORDER BY path\n"
        f"    images_root: '{lake}'\n" + TRAIN.format(quarantine=quarantine)
    )
    return path


def cli_outputs(cfg: Path, run_id: str, model: str | None) -> str:
    """Everything the read commands print about the project, tables and JSON."""
    c = ["-c", str(cfg)]
    calls = [["runs"], ["runs", "--json"], ["runs", "show", run_id], ["runs", "show", run_id,
             "--json"], ["datasets"], ["datasets", "--json"], ["audit", "--json"],
             ["models", "--json"]]  # fmt: skip
    if model:
        calls += [["models", "show", model], ["models", "show", model, "--json"]]
    printed = []
    for args in calls:
        code, out, err = invoke(*args, *c)
        assert code == 0, (args, err)
        printed.append(out + err)
    return "\n".join(printed)


def pg_rows(url: str) -> str:
    """Every row of every table in the store's schema, as text."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            tables = inspect(conn).get_table_names()
            assert {"pipeline_runs", "step_runs", "dataset_versions", "model_versions"} <= set(
                tables
            ), tables
            return "\n".join(
                str(row)
                for table in tables
                for row in conn.execute(text(f'SELECT CAST(t AS text) FROM "{table}" t'))
            )
    finally:
        engine.dispose()


def files_text(*folders: Path) -> bytes:
    return b"\n".join(
        p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file()
    )


def test_a_full_build_stores_and_prints_no_password(
    tmp_path: Path, warehouse: str, tiny_lake: Path
) -> None:
    pw = secret()
    url = with_password(warehouse, pw)
    cfg = write_config(
        tmp_path / "loopline.yaml", warehouse_url=url, metadata_url=url, lake=tiny_lake,
        quarantine=0.3,
    )  # fmt: skip
    code, out, err = invoke("build", "-c", str(cfg))
    assert code == 0, out + err
    # The password rotated: no cache key holds it, so every step is reused.
    rotated = secret()
    url = with_password(warehouse, rotated)
    write_config(cfg, warehouse_url=url, metadata_url=url, lake=tiny_lake, quarantine=0.3)
    code, out_json, err_json = invoke("build", "-c", str(cfg), "--json")
    assert code == 0, err_json
    built = json.loads(out_json)
    assert {s["status"] for s in built["steps"]} == {"cached"}, built["steps"]
    printed = out + err + out_json + err_json
    printed += cli_outputs(cfg, built["run_id"], "tiny:1")
    stored = pg_rows(warehouse)
    artifacts = files_text(tmp_path / "artifacts")
    for form in forms(pw) + forms(rotated):
        assert form not in printed
        assert form not in stored
        assert form.encode() not in artifacts
    assert "postgres:***@127.0.0.1" in printed  # shown masked, not dropped
    code, out, _ = invoke("datasets", "--json", "-c", str(cfg))
    (dataset,) = json.loads(out)
    assert dataset["source_uri"].startswith("postgresql+psycopg://postgres:***@127.0.0.1:5432/")
    code, out, _ = invoke("models", "show", "tiny:1", "--json", "-c", str(cfg))
    assert json.loads(out)["lineage"]["dataset_source"] == dataset["source_uri"]


@pytest.mark.parametrize("how", ["inline", "environment"])
def test_a_failed_run_resumes_without_its_password_being_stored(
    tmp_path: Path, warehouse: str, tiny_lake: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pw = secret()
    if how == "inline":
        url = with_password(warehouse, pw)
    else:
        monkeypatch.setenv("LOOPLINE_TEST_WAREHOUSE_PASSWORD", pw)
        url = with_password(warehouse, "PLACEHOLDER").replace(
            "PLACEHOLDER", "${LOOPLINE_TEST_WAREHOUSE_PASSWORD}"
        )
    db = tmp_path / "state" / "loopline.db"
    cfg = write_config(
        tmp_path / "loopline.yaml", warehouse_url=url, metadata_url=f"sqlite:///{db}",
        lake=tiny_lake, quarantine=0.0,  # the tiny lake's defects fail validation
    )  # fmt: skip
    code, out, err = invoke("build", "-c", str(cfg))
    assert code == 1 and "quarantined" in err, out + err
    code, runs_json, _ = invoke("runs", "--json", "-c", str(cfg))
    run_id = json.loads(runs_json)[0]["id"]
    # The resumed run connects again (ingest's fingerprint reads the warehouse), then fails
    # at validation as before: not on a missing password.
    code, out2, err2 = invoke("build", "-c", str(cfg), "--resume", run_id)
    assert code == 1 and "quarantined" in err2, out2 + err2
    printed = out + err + out2 + err2 + cli_outputs(cfg, run_id, None)
    on_disk = files_text(db.parent, tmp_path / "artifacts")  # SQLite file (and WAL), artifacts
    for form in forms(pw):
        assert form not in printed
        assert form.encode() not in on_disk
    code, show, _ = invoke("runs", "show", run_id, "--json", "-c", str(cfg))
    stored_url = json.loads(show)["config"]["data"]["source"]["url"]
    if how == "inline":
        assert ":***@" in stored_url
    else:
        assert "${LOOPLINE_TEST_WAREHOUSE_PASSWORD}" in stored_url
        monkeypatch.delenv("LOOPLINE_TEST_WAREHOUSE_PASSWORD")
        code, _, err3 = invoke("build", "-c", str(cfg), "--resume", run_id)
        assert code == 1
        assert "LOOPLINE_TEST_WAREHOUSE_PASSWORD}, which is not set" in err3
