"""Two ``loopline build`` processes on one store at once both finish, as distinct versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from loopline.drivers.metadata.store import MetadataStore
from tests.conftest import TINY_CONFIG


def test_two_concurrent_builds_on_one_store(db_url: str, tmp_path: Path, tiny_lake: Path) -> None:
    artifacts = tmp_path / "state" / "artifacts"
    configs = []
    for lr in ("0.01", "0.02"):  # different hyper-parameters: different bundles
        folder = tmp_path / f"lr{lr}"
        folder.mkdir()
        text = TINY_CONFIG.format(db=db_url, artifacts=artifacts, lake=tiny_lake)
        text = text.replace("lr: [0.01]", f"lr: [{lr}]").replace(
            "epochs: 1", "epochs: 1\n  threads: 1"
        )
        (folder / "loopline.yaml").write_text(text)
        configs.append(folder / "loopline.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="120")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "loopline.cli.main", "build", "-c", str(c), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for c in configs
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    built = [json.loads(out) for out, _ in outs]
    assert [b["status"] for b in built] == ["succeeded", "succeeded"]
    assert sorted(b["model"]["version"] for b in built) == [1, 2]
    assert built[0]["model"]["bundle_sha256"] != built[1]["model"]["bundle_sha256"]

    store = MetadataStore(db_url)
    try:
        assert [m.version for m in store.models.versions("tiny")] == [1, 2]
        assert {r.status for r in store.runs.recent()} == {"succeeded"}
        assert len(store.datasets.all()) == 1  # both recorded the same lake's version
        assert store.models.get("tiny", alias="candidate").version in (1, 2)
    finally:
        store.close()
