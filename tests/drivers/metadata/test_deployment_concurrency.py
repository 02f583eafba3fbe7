"""100 concurrent promote, canary and rollback calls (threads in several processes) leave
exactly one production version and one unbroken history, on SQLite and PostgreSQL."""

from __future__ import annotations

from loopline.drivers.metadata.store import MetadataStore
from tests.drivers.metadata import workers


def test_a_hundred_concurrent_promotions_and_rollbacks(db_url: str) -> None:
    store = MetadataStore(db_url)
    for v in range(1, 5):
        store.models.register("vehicles", bundle_uri="/b", bundle_sha256=f"{v:064x}", aliases=())
    store.close()
    ops = ("promote", "rollback", "canary", "promote", "rollback")
    # 4 processes x 5 threads x 5 calls = 100 calls.
    plans = [
        [[(ops[(p + t + m) % 5], 1 + (p * 5 + t * 3 + m) % 4) for m in range(5)] for t in range(5)]
        for p in range(4)
    ]
    got = [r for proc in workers.in_processes(
        workers.release_calls, [(db_url, plans[p]) for p in range(4)]
    ) for r in proc]  # fmt: skip
    assert len(got) == 100
    unexpected = [
        r for r in got
        if not r.startswith("ok:")
        and "nothing of vehicles to roll back" not in r
        and "no previous version of vehicles" not in r
        and "no stable version yet" not in r
        and "is already the stable version" not in r
    ]  # fmt: skip
    assert unexpected == []

    store = MetadataStore(db_url)
    dep = store.deployments.get("production")
    assert dep is not None and dep.stable_version is not None
    # One production version: the alias and the record agree.
    assert store.models.get("vehicles", alias="production").version == dep.stable_version
    # One unbroken history: generations 1..N, each once, the last one the current state.
    hist = store.deployments.history("production", limit=1000)
    assert [h["generation"] for h in reversed(hist)] == list(range(1, dep.generation + 1))
    last = hist[0]
    assert (last["stable_version"], last["candidate_version"]) == (
        dep.stable_version,
        dep.candidate_version,
    )
    # Every successful call that changed something made exactly one generation.
    changed = {int(r.split(":")[1]) for r in got if r.startswith("ok:")}
    assert changed <= set(range(1, dep.generation + 1))
    audits = [e for e in store.audit.recent(2000) if e.action.startswith("deployment.")]
    assert len(audits) == dep.generation
    store.close()
