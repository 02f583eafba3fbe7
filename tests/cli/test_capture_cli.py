"""``loopline capture list`` and ``loopline capture purge``: retention, dataset references and
the size cap from loopline.yaml, rows deleted before their blobs, one-line errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopline.cli.main import app
from loopline.config import load_config
from loopline.digest import sha256_bytes
from loopline.drivers.artifacts.store import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore

CONFIG = """\
project: capture-test
model: {name: vehicles}
environments:
  production:
    capture: {retention_days: 10, max_total_bytes: 1350}
  staging:
    capture: {retention_days: 1}
"""
BLOBS = {"A": b"a" * 200, "B": b"b" * 300, "C": b"c" * 500, "D": b"d" * 600}
# prediction id: (blob, age in days); every row was captured under a 30-day retention.
ROWS = {"old": ("A", 20), "young1": ("B", 3), "young2": ("C", 2), "used": ("D", 50),
        "shared": ("A", 0.5)}  # fmt: skip


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def project(tmp_path: Path) -> Path:
    config = tmp_path / "loopline.yaml"
    config.write_text(CONFIG)
    cfg = load_config(config)
    blobs = ArtifactStore(cfg.artifacts_url())
    for data in BLOBS.values():
        blobs.put_bytes(data)
    now = datetime.now(UTC)
    rows = []
    for pid, (blob, age) in ROWS.items():
        at = now - timedelta(days=age)
        data = BLOBS[blob]
        rows.append({"prediction_id": pid, "sha256": sha256_bytes(data), "bytes": len(data),
                     "media_type": "image/png", "environment": "production", "at": at,
                     "expires_at": at + timedelta(days=30)})  # fmt: skip
    store = MetadataStore(cfg.metadata_url())
    store.captures.record(rows)
    store.captures.mark_used(["used"], "ds-1")
    store.close()
    return config


def blobs_left(config: Path) -> set[str]:
    blobs = ArtifactStore(load_config(config).artifacts_url())
    return {name for name, data in BLOBS.items() if blobs.exists(sha256_bytes(data))}


def test_list_shows_captures_newest_first(project: Path) -> None:
    code, out, _ = invoke("capture", "list", "--config", str(project), "--json")
    assert code == 0
    assert [r["prediction_id"] for r in json.loads(out)] == [
        "shared", "young2", "young1", "old", "used"
    ]  # fmt: skip
    code, out, _ = invoke("capture", "list", "--config", str(project), "--json", "--limit", "2")
    assert [r["prediction_id"] for r in json.loads(out)] == ["shared", "young2"]
    code, out, _ = invoke("capture", "list", "--config", str(project))
    assert code == 0 and "5 of 5 capture(s)" in out


def test_purge_applies_retention_references_and_the_cap(project: Path) -> None:
    code, out, _ = invoke("capture", "purge", "--config", str(project), "--dry-run", "--json")
    assert code == 0
    plan = json.loads(out)
    # Retention 10 days (not the 30 the rows were captured with); "used" is referenced.
    assert plan["dry_run"] is True and plan["expired"] == ["old"]
    # Then 1600 bytes of distinct blobs against a cap of 1350: the oldest unreferenced goes.
    assert plan["over_cap"] == ["young1"] and plan["blobs_deleted"] == []
    assert plan["orphaned_blobs"] == [sha256_bytes(BLOBS["B"])]
    assert blobs_left(project) == set(BLOBS)  # a dry run deletes nothing

    code, out, _ = invoke("capture", "purge", "--config", str(project), "--json")
    assert code == 0
    done = json.loads(out)
    assert done["deleted_rows"] == 2 and done["environment"] == "production"
    # Blob A stays: "shared" holds the same bytes as "old".
    assert done["blobs_deleted"] == [sha256_bytes(BLOBS["B"])]
    assert blobs_left(project) == {"A", "C", "D"}
    assert done["remaining_rows"] == 3 and done["remaining_bytes"] == 1300

    code, out, _ = invoke("capture", "purge", "--config", str(project), "--env", "staging")
    assert code == 0
    assert "deleted young2 (past retention" in out
    assert "deleted 1 capture(s) and 1 image blob(s)" in out and "retention 1 days" in out
    assert blobs_left(project) == {"A", "D"}
    store = MetadataStore(load_config(project).metadata_url())
    try:
        assert {r.prediction_id for r in store.captures.recent()} == {"used", "shared"}
    finally:
        store.close()


def test_errors_are_one_line(project: Path, tmp_path: Path) -> None:
    code, _, err = invoke("capture", "purge", "--config", str(project), "--env", "nowhere")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: no environment 'nowhere'") and "production" in err
    code, _, err = invoke("capture", "list", "--config", str(tmp_path / "none" / "x.yaml"))
    assert code == 1 and err.count("\n") == 1 and err.startswith("error:")
