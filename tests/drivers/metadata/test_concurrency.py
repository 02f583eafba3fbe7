"""Concurrent writers of one metadata store, on SQLite and PostgreSQL.

Each race is run by threads inside several real processes (``workers.in_processes``), as
concurrent ``loopline`` commands and server workers are. The store must answer every
caller without a traceback and leave one consistent state.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from loopline.drivers.metadata.store import MetadataStore
from tests.drivers.metadata import workers

PROCS = 3


@pytest.fixture
def store(db_url: str) -> Iterator[MetadataStore]:
    s = MetadataStore(db_url)
    yield s
    s.close()


@pytest.fixture
def new_url(
    request: pytest.FixtureRequest, db_url: str, tmp_path: Path
) -> Iterator[Callable[[], str]]:
    """URLs of stores that do not exist yet, on the backend of ``db_url``."""
    schemas: list[str] = []
    if db_url.startswith("sqlite"):
        names = iter(range(1000))
        yield lambda: f"sqlite:///{tmp_path / f'new{next(names)}' / 'loopline.db'}"
        return
    pg_url = str(request.getfixturevalue("pg_url"))
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")

    def make() -> str:
        schema = f"n_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        schemas.append(schema)
        return f"{pg_url}?options=-csearch_path%3D{schema}"

    try:
        yield make
    finally:
        with admin.connect() as conn:
            for schema in schemas:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _models(store: MetadataStore, n: int) -> None:
    for v in range(1, n + 1):
        store.models.register("vehicles", bundle_uri="/b", bundle_sha256=f"{v:064x}", aliases=())


def test_recording_one_dataset_version_concurrently(db_url: str, store: MetadataStore) -> None:
    version = "d" * 64
    got = workers.in_processes(workers.add_dataset, [(db_url, version, 4)] * PROCS)
    assert [r for proc in got for r in proc] == [version] * (PROCS * 4)
    assert [d.version for d in store.datasets.all()] == [version]


def test_a_hundred_concurrent_alias_moves(db_url: str, store: MetadataStore) -> None:
    _models(store, 3)
    store.models.set_alias("vehicles", "production", 1)
    store.models.set_alias("vehicles", "staging", 1)
    # 4 processes x 5 threads x 5 moves, over two aliases and three versions.
    plans = [
        [
            [("production", "staging")[(p + t + m) % 2], 1 + (p * 7 + t * 3 + m) % 3]
            for m in range(5)
        ]
        for p in range(4)
        for t in range(5)
    ]
    args = [(db_url, "vehicles", plans[p * 5 : p * 5 + 5]) for p in range(4)]
    got = workers.in_processes(workers.move_aliases, args)
    assert [r for proc in got for r in proc] == ["ok"] * 20

    holders = store.models.aliases("vehicles")
    assert sorted(a for names in holders.values() for a in names) == ["production", "staging"]
    moves = [e for e in store.audit.recent(limit=500) if e.action == "model.alias"]
    assert len(moves) == 100 + 2
    for alias in ("production", "staging"):
        last = next(e for e in moves if e.details["alias"] == alias)  # newest first
        assert store.models.get("vehicles", alias=alias).version == int(last.subject.split(":")[1])


@pytest.mark.parametrize("expected", [1, None], ids=["from-version-1", "must-not-exist"])
def test_concurrent_compare_and_set_moves_one_wins(
    db_url: str, store: MetadataStore, expected: int | None
) -> None:
    _models(store, 7)
    if expected is not None:
        store.models.set_alias("vehicles", "production", expected)
    targets = [[2 + p * 3 + t for t in range(3)] for p in range(2)]  # 2 processes x 3 threads
    got = [r for proc in workers.in_processes(
        workers.cas_alias,
        [(db_url, "vehicles", "production", t, expected) for t in targets],
    ) for r in proc]  # fmt: skip
    won = [r for r in got if r.startswith("won:")]
    assert len(won) == 1, got
    assert all(
        r.startswith("conflict: alias vehicles@production points at") for r in got if r not in won
    )
    winner = int(won[0].split(":")[1])
    assert store.models.aliases("vehicles") == {("vehicles", winner): ["production"]}


def test_concurrent_registrations_of_one_bundle_give_one_version(
    db_url: str, store: MetadataStore
) -> None:
    sha = "ab" * 32
    got = [tuple(r) for proc in workers.in_processes(
        workers.register, [(db_url, "vehicles", [sha] * 3)] * 2
    ) for r in proc]  # fmt: skip
    assert sorted(got) == [(1, False)] * 5 + [(1, True)]
    assert [m.version for m in store.models.versions(include_archived=True)] == [1]


def test_concurrent_registrations_of_different_bundles_give_distinct_versions(
    db_url: str, store: MetadataStore
) -> None:
    shas = [[f"{p}{t}".rjust(64, "0") for t in range(4)] for p in range(PROCS)]
    got = [tuple(r) for proc in workers.in_processes(
        workers.register, [(db_url, "vehicles", s) for s in shas]
    ) for r in proc]  # fmt: skip
    assert sorted(got) == [(v, True) for v in range(1, 4 * PROCS + 1)]
    assert store.models.get("vehicles", alias="candidate").version in range(1, 4 * PROCS + 1)


def test_archiving_races_alias_moves_without_an_archived_holder(
    db_url: str, store: MetadataStore
) -> None:
    """An alias move onto a version and its archive never both win.

    Rounds of 2 processes x 4 threads: in each, two threads of each process archive
    ``name:2`` while the two others point aliases at it, all started together.
    """
    names = [f"m{r}" for r in range(8)]
    for name in names:
        for v in (1, 2):
            store.models.register(name, bundle_uri="/b", bundle_sha256=f"{v:064x}", aliases=())
        store.models.set_alias(name, "production", 1)
    got = workers.in_processes(workers.archive_or_alias, [(db_url, names, p, 4) for p in (0, 1)])
    outcomes = Counter()
    for r, name in enumerate(names):
        results = [res for proc in got for res in proc[r]]
        assert all(
            res in ("archived", "aliased")
            or res.startswith(
                (f"refused: {name}:2 holds aliases", f"refused: {name}:2 is archived")
            )
            for res in results
        ), results
        outcomes.update(results)
        version = store.models.get(name, 2)
        holds = store.models.aliases(name).get((name, 2), [])
        assert not (version.archived_at is not None and holds), (name, results, holds)
        assert (version.archived_at is not None) == ("archived" in results), results
        assert sorted(holds) == sorted(
            f"a{p}{k}" for p in (0, 1) for k in (1, 3) if got[p][r][k] == "aliased"
        )
    assert sum(outcomes.values()) == 8 * len(names)


def test_a_registration_waits_for_an_archive_of_the_equal_version(pg_schema_url: str) -> None:
    """PostgreSQL: the name's advisory lock does not exclude an archive, which locks the
    version's row; a registration equal to that version must wait for the archive and,
    once it is archived, register a new version instead of naming an archived one."""
    store = MetadataStore(pg_schema_url)
    sha = "cd" * 32
    store.models.register("vehicles", bundle_uri="/b", bundle_sha256=sha, aliases=())
    engine = create_engine(pg_schema_url)
    admin = create_engine(pg_schema_url, isolation_level="AUTOCOMMIT")
    outcome: dict[str, Any] = {}

    def register() -> None:
        try:
            outcome["reg"] = store.models.register(
                "vehicles", bundle_uri="/b", bundle_sha256=sha, aliases=()
            )
        except BaseException as err:  # reported below
            outcome["error"] = err

    try:
        with engine.connect() as conn:
            # An archive of vehicles:1 in progress, as archive_version makes it: the row
            # locked and updated, not committed yet.
            tx = conn.begin()
            where = "WHERE name = 'vehicles' AND version = 1"
            conn.execute(text(f"SELECT 1 FROM model_versions {where} FOR UPDATE"))
            conn.execute(text(f"UPDATE model_versions SET archived_at = now() {where}"))
            archiver = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            thread = threading.Thread(target=register)
            thread.start()
            blocked = text(
                "SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"
            )
            # Until the registration either waits on the archive or has returned without.
            for _ in range(2400):  # a hang guard only, never an assertion on time
                with admin.connect() as watch:
                    if not thread.is_alive() or watch.execute(blocked, {"pid": archiver}).scalar():
                        break
                time.sleep(0.05)
            tx.commit()
        thread.join(timeout=120)
    finally:
        engine.dispose()
        admin.dispose()
    assert "error" not in outcome, outcome
    reg = outcome["reg"]
    assert (reg.version.version, reg.created) == (2, True), "named an archived version"
    assert store.models.get("vehicles", 1).archived_at is not None
    store.close()


def test_two_processes_opening_new_stores_at_once(new_url: Callable[[], str]) -> None:
    urls = [new_url() for _ in range(5)]
    got = workers.in_processes(workers.open_new_stores, [(urls,)] * 4)
    assert got == [["ok"] * 5] * 4
    for url in urls:
        store = MetadataStore(url, migrate=False)
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        store.close()


def test_concurrent_claims_of_one_run_one_wins(db_url: str, store: MetadataStore) -> None:
    store.runs.create("r1", pipeline="build", project="tiny", config={})
    store.runs.update("r1", status="failed", error="boom")
    got = [r for proc in workers.in_processes(workers.claim, [(db_url, "r1", 2)] * 2) for r in proc]
    winners = [pid for won, pid in got if won]
    assert len(winners) == 1, got
    assert Counter(pid for _, pid in got) == Counter({winners[0]: 4})  # all saw the winner
    run = store.runs.get("r1")
    assert (run.pid, run.error) == (winners[0], None) and winners[0] != os.getpid()
    assert run.status == "interrupted"  # the winning process has exited since
    assert store.runs.claim("r1").won  # ... so its run can be taken over again
