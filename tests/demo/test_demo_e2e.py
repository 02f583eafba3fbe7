"""``loopline demo --fast``: the whole loop, unattended, through the real CLI (slow: it
trains two models and serves real traffic for a minute or two)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loopline.drivers.targets.local import running_supervisor

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1200)
def test_the_demo_runs_the_whole_loop_and_accuracy_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    loopline = Path(sys.executable).with_name("loopline")
    proc = subprocess.run(
        [str(loopline), "demo", "--fast", "--dir", str(folder), "--json"],
        capture_output=True,
        text=True,
        timeout=1100,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    assert doc == json.loads((folder / "timeline.json").read_text())

    # The keys scripts rely on.
    alert = doc["alert_at"]
    assert alert["rule"] == "accuracy-low"
    assert alert["seconds"] > 0 and alert["labelled"] >= 30  # the rule's minimum sample
    assert doc["versions_deployed"] == [1, 2]
    acc = doc["accuracy"]
    assert set(acc) >= {"before_drift", "lowest", "after_recovery"}
    assert acc["lowest"] < 0.40 < acc["after_recovery"]
    assert acc["after_recovery"] >= acc["before_drift"] - 0.10 and acc["recovered"] is True
    assert acc["after_recovery_labelled"] >= doc["scenario"]["recovery_labels"]
    assert doc["ok"] is True and doc["requests"]["errors"] == 0
    assert doc["timings"]["alert_to_v2_serving_all_s"] > 0

    # v2 came from the loop the alert started, and its lineage is traced.
    v1, v2 = doc["versions"]
    assert (v1["trigger"], v2["trigger"]) == ("manual", "alert")
    assert v1["production"]["by_condition"]["day"]["accuracy"] > 0.7
    assert v1["production"]["by_condition"]["night"]["accuracy"] < 0.4
    kinds = [link["kind"] for link in doc["lineage"]["chain"]]
    assert kinds[:5] == ["alert", "dataset_version", "run", "model_version", "replica_test"]
    assert "deployment" in kinds
    assert doc["lineage"]["loop"]["status"] == "succeeded"
    assert [e for e in doc["timeline"] if e["kind"] == "drift"]
    assert [e for e in doc["timeline"] if e["kind"] == "redeploy"]

    # The report holds the plot and its markers; nothing is left running.
    html = (folder / "report.html").read_text()
    for mark in (
        'polyline class="accuracy"',
        'class="threshold"',
        "marker-drift",
        "marker-alert",
        "marker-redeploy",
    ):
        assert mark in html, mark
    assert running_supervisor(folder / ".loopline" / "envs" / "production") is None
    # And it is an ordinary project afterwards.
    shown = subprocess.run(
        [str(loopline), "alerts", "show", str(alert["alert_id"]), "--json"],
        capture_output=True,
        text=True,
        cwd=folder,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["alert"]["id"] == alert["alert_id"]
