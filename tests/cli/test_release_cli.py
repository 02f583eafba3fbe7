"""`loopline promote/rollback/deployments/status`: thin shells over the release library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_cli import invoke, one_line_error


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """m:1..m:3 registered; 1 and 2 passed their replica tests, 3 failed."""
    from loopline.drivers.metadata.store import MetadataStore

    cfg = tmp_path / "loopline.yaml"
    url = f"sqlite:///{tmp_path / 'm.db'}"
    cfg.write_text(
        f"store: {{metadata_url: '{url}'}}\n"
        "environments:\n"
        "  production: {port: 9123, canary: {share: 0.3}}\n"
        "  edge-a: {target: edge}\n"
    )
    store = MetadataStore(url)
    for i in (1, 2, 3):
        store.models.register("m", bundle_uri=f"x{i}", bundle_sha256=f"{i}" * 64)
        store.replica_tests.record("m", i, environment="staging", passed=i != 3,
                                   reasons=["p95 812.0 ms > 500 ms"] if i == 3 else [],
                                   report={})  # fmt: skip
    store.close()
    return cfg


def test_promote_canary_rollback_and_the_listings(registry: Path) -> None:
    c = ["-c", str(registry)]
    code, out, err = invoke("promote", "m:1", "--to", "production", "-m", "first", *c)
    assert code == 0 and "production: m:1 (generation 1)" in out, err
    code, out, err = invoke("promote", "m:2", "--strategy", "canary", "--json", *c)
    assert code == 0, err
    dep = json.loads(out)
    assert (dep["stable_version"], dep["candidate_version"], dep["candidate_share"]) == (1, 2, 0.3)

    code, out, err = invoke("status", "--json", *c)
    assert code == 0, err
    by_env = {s["environment"]: s for s in json.loads(out)}
    assert set(by_env) == {"staging", "production", "edge-a"}
    assert by_env["production"]["traffic"] == {"m:1": 0.7, "m:2": 0.3}
    assert by_env["production"]["health"] == "not running"  # no server reported yet
    assert by_env["production"]["endpoint"] == "http://127.0.0.1:9123"
    assert by_env["edge-a"]["target"] == "edge"
    code, out, err = invoke("status", *c)
    assert code == 0 and "m:1 70%, m:2 30%" in out, err

    code, out, err = invoke("rollback", "m", "--env", "production", *c)
    assert code == 0 and "production: m:1 (generation 3)" in out, err
    code, out, err = invoke("deployments", "--env", "production", "--json", *c)
    assert code == 0, err
    [row] = json.loads(out)
    assert [h["action"] for h in row["history"]] == ["rollback", "canary", "promote"]
    assert row["history"][-1]["reason"] == "first"
    code, out, err = invoke("deployments", *c)
    assert code == 0 and "production history" in out and "rollback" in out, err


def test_a_failed_replica_test_blocks_promotion_and_says_why(registry: Path) -> None:
    code, _, err = invoke("promote", "m:3", "-c", str(registry))
    assert code == 1
    line = one_line_error(err)
    assert "m:3 failed its latest replica test" in line and "p95 812.0 ms > 500 ms" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["promote", "m:1", "--to", "prod"], "no environment 'prod'"),
        (["promote", "m:1", "--strategy", "blue-green"], "unknown strategy 'blue-green'"),
        (["promote", "m:9"], "no model version m:9"),
        (["promote", "m:2", "--strategy", "canary", "--share", "1.5"], "canary share 1.5"),
        (["rollback", "m"], "production serves nothing"),
        (["deployments", "--env", "nope"], "no environment 'nope'"),
    ],
)
def test_mistakes_are_one_line_errors(registry: Path, args: list[str], message: str) -> None:
    if args[0] == "promote" and "--share" in args:
        assert invoke("promote", "m:1", "-c", str(registry))[0] == 0
    code, _, err = invoke(*args, "-c", str(registry))
    assert code == 1 and message in one_line_error(err)
