"""Conformance suite of the metadata store: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import inspect, text

from loopline.drivers.metadata.store import MIGRATIONS, MetadataStore
from loopline.errors import NotFound, StoreError

CORE_TABLES = {
    "dataset_versions",
    "pipeline_runs",
    "step_runs",
    "hpo_trials",
    "model_versions",
    "model_aliases",
    "audit_log",
    "alembic_version",
}


def _alembic_head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _model(store: MetadataStore, name: str = "vehicles", **fields: Any) -> Any:
    fields.setdefault("bundle_uri", f"/artifacts/{name}.tar")
    fields.setdefault("bundle_sha256", "ab" * 32)
    return store.register_model(name, **fields)


def _run(store: MetadataStore, run_id: str) -> Any:
    return store.create_run(run_id, pipeline="build", project="tiny", config={"a": 1})


@pytest.fixture
def store(db_url: str) -> Iterator[MetadataStore]:
    s = MetadataStore(db_url)
    yield s
    s.close()


# -- schema ------------------------------------------------------------------------------
def test_migrations_create_the_schema_at_head(store: MetadataStore) -> None:
    assert set(inspect(store.engine).get_table_names()) >= CORE_TABLES
    with store.engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    assert versions == [_alembic_head()]


def test_opening_twice_is_idempotent_and_keeps_data(db_url: str) -> None:
    first = MetadataStore(db_url)
    _run(first, "r1")
    first.close()
    second = MetadataStore(db_url)
    try:
        assert second.get_run("r1").id == "r1"
        with second.engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars()
            assert list(versions) == [_alembic_head()]
    finally:
        second.close()


def test_an_older_schema_is_upgraded_on_open(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    if _alembic_head() == "0001":
        pytest.skip("only one migration exists")
    bare = MetadataStore(db_url, migrate=False)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with bare.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    bare.close()
    store = MetadataStore(db_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == (
                _alembic_head()
            )
    finally:
        store.close()


# -- datasets ----------------------------------------------------------------------------
def test_dataset_versions_are_idempotent_and_found_by_prefix(store: MetadataStore) -> None:
    fields = dict(
        name="tiny", source_uri="/lake", n_records=3, records_sha256="0" * 64, stats={"n": 3}
    )
    a = store.add_dataset_version(version="abc123" + "0" * 58, **fields)
    again = store.add_dataset_version(version=a.version, **{**fields, "n_records": 99})
    assert again.n_records == 3
    store.add_dataset_version(version="abd456" + "0" * 58, **fields)
    assert len(store.list_dataset_versions()) == 2
    assert store.get_dataset_version("abc1").version == a.version
    assert store.get_dataset_version(a.version).stats == {"n": 3}
    with pytest.raises(NotFound, match="ab"):
        store.get_dataset_version("ab")  # ambiguous prefix
    with pytest.raises(NotFound, match="zzz"):
        store.get_dataset_version("zzz")


# -- runs --------------------------------------------------------------------------------
def test_runs_create_update_get_list(store: MetadataStore) -> None:
    run = _run(store, "20260101-000000-aaaaaa")
    assert run.status == "running"
    _run(store, "20260101-000001-bbbbbb")
    store.update_run("20260101-000000-aaaaaa", status="failed", error="boom", dataset_version="d1")
    got = store.get_run("20260101-000000-aaaaaa")
    assert (got.status, got.error, got.dataset_version) == ("failed", "boom", "d1")
    assert got.config == {"a": 1}
    assert got.pipeline == "build" and got.project == "tiny"
    assert store.get_run("20260101-000001").id == "20260101-000001-bbbbbb"
    assert {r.id for r in store.list_runs()} == {
        "20260101-000000-aaaaaa",
        "20260101-000001-bbbbbb",
    }
    assert len(store.list_runs(limit=1)) == 1


def test_unknown_or_ambiguous_run_is_not_found(store: MetadataStore) -> None:
    _run(store, "r-one")
    _run(store, "r-two")
    with pytest.raises(NotFound, match="loopline runs"):
        store.get_run("nope")
    with pytest.raises(NotFound):
        store.get_run("r-")


def test_a_running_run_whose_process_is_gone_is_interrupted(store: MetadataStore) -> None:
    _run(store, "dead")
    _run(store, "alive")
    _run(store, "elsewhere")
    store.update_run("dead", pid=_dead_pid(), host=socket.gethostname())
    store.update_run("elsewhere", pid=_dead_pid(), host="another-host.example")
    assert store.get_run("dead").status == "interrupted"
    assert store.get_run("alive").status == "running"  # this process
    assert store.get_run("elsewhere").status == "running"  # cannot tell from here
    statuses = {r.id: r.status for r in store.list_runs()}
    assert statuses == {"dead": "interrupted", "alive": "running", "elsewhere": "running"}


# -- steps -------------------------------------------------------------------------------
def test_steps_start_finish_and_cache_lookup(store: MetadataStore) -> None:
    _run(store, "r1")
    common = dict(cache_key="k" * 64, code_version="c" * 64, params={"x": 1})
    first = store.start_step("r1", "train", **common)
    assert store.find_cached_step("train", "k" * 64) is None  # still running
    store.finish_step(first, status="succeeded", outputs={"model": {"sha256": "1"}})
    second = store.start_step("r1", "train", **common)
    store.finish_step(second, status="succeeded", outputs={"model": {"sha256": "2"}})
    failed = store.start_step("r1", "train", **common)
    store.finish_step(failed, status="failed", error="boom")

    hit = store.find_cached_step("train", "k" * 64)
    assert hit is not None and hit.id == second and hit.outputs == {"model": {"sha256": "2"}}
    assert store.find_cached_step("train", "other") is None
    assert store.find_cached_step("evaluate", "k" * 64) is None

    steps = store.list_steps("r1")
    assert [s.id for s in steps] == [first, second, failed]
    assert [s.status for s in steps] == ["succeeded", "succeeded", "failed"]
    assert steps[2].error == "boom"
    assert steps[0].finished_at is not None and steps[0].duration_s >= 0
    with pytest.raises(NotFound):
        store.finish_step(10**6, status="succeeded")


# -- trials ------------------------------------------------------------------------------
def test_trials_are_recorded_replaced_and_listed(store: MetadataStore) -> None:
    _run(store, "r1")
    store.record_trial("r1", 1, state="complete", params={"lr": 0.1}, value=0.5, epochs=2)
    store.record_trial("r1", 0, state="pruned", params={"lr": 0.3}, value=0.1, epochs=1)
    store.record_trial("r1", 1, state="complete", params={"lr": 0.1}, value=0.7, epochs=3)
    trials = store.list_trials("r1")
    assert [(t.number, t.state, t.value, t.epochs) for t in trials] == [
        (0, "pruned", 0.1, 1),
        (1, "complete", 0.7, 3),
    ]
    assert store.list_trials("other") == []


# -- models ------------------------------------------------------------------------------
def test_register_gives_increasing_versions_and_moves_candidate(store: MetadataStore) -> None:
    versions = [_model(store, metrics={"f1": i / 10}).version for i in range(3)]
    assert versions == [1, 2, 3]
    assert _model(store, "other").version == 1
    assert store.aliases("vehicles") == {("vehicles", 3): ["candidate"]}
    assert store.resolve_model("vehicles@candidate").version == 3
    no_alias = _model(store, aliases=())
    assert no_alias.version == 4
    assert store.resolve_model("vehicles@candidate").version == 3
    assert [m.version for m in store.list_model_versions("vehicles")] == [1, 2, 3, 4]
    assert len(store.list_model_versions()) == 5


def test_concurrent_registrations_get_unique_versions(store: MetadataStore) -> None:
    got: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def register() -> None:
        for _ in range(3):
            try:
                version = _model(store).version
            except BaseException as err:  # collected and asserted on below
                with lock:
                    errors.append(err)
            else:
                with lock:
                    got.append(version)

    threads = [threading.Thread(target=register) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(got) == list(range(1, 13))
    assert store.resolve_model("vehicles@candidate").version == 12


def test_resolve_model_refs(store: MetadataStore) -> None:
    for _ in range(3):
        _model(store)
    store.set_alias("vehicles", "production", 2)
    assert store.resolve_model("vehicles").version == 3
    assert store.resolve_model("vehicles:1").version == 1
    assert store.resolve_model("vehicles@production").version == 2
    assert store.resolve_model("vehicles@candidate").version == 3


BAD_REFS = [
    ("nope", "no model version nope"),
    ("vehicles:9", "no model version vehicles:9"),
    ("nope:1", "no model version nope:1"),
    ("vehicles@staging", "has no alias 'staging'"),
    ("x:abc", "invalid model version 'abc'.*integers"),
    ("@prod", "invalid model reference"),
    ("vehicles@", "invalid model reference"),
]


def test_resolve_model_errors(store: MetadataStore) -> None:
    _model(store)
    for ref, message in BAD_REFS:  # one store for all cases: opening one costs a migration
        with pytest.raises(NotFound, match=message):
            store.resolve_model(ref)


def test_set_alias_on_a_missing_version_is_not_found(store: MetadataStore) -> None:
    _model(store)
    with pytest.raises(NotFound, match="vehicles:7"):
        store.set_alias("vehicles", "production", 7)
    with pytest.raises(NotFound):
        store.set_alias("nope", "production", 1)
    assert store.aliases("vehicles") == {("vehicles", 1): ["candidate"]}


def test_audit_log_records_register_and_alias(store: MetadataStore) -> None:
    _model(store, run_id="r1", actor="alice")
    store.set_alias("vehicles", "production", 1, actor="bob")
    store.audit("carol", "run.resume", "r1", note="x")
    events = store.audit_log()
    assert [(e.actor, e.action, e.subject) for e in events] == [
        ("carol", "run.resume", "r1"),
        ("bob", "model.alias", "vehicles:1"),
        ("alice", "model.register", "vehicles:1"),
    ]
    assert events[1].details == {"alias": "production"}
    assert events[2].details == {"aliases": ["candidate"], "run_id": "r1"}
    assert events[0].details == {"note": "x"}
    assert len(store.audit_log(limit=1)) == 1


def test_model_version_dict_is_the_cli_contract(store: MetadataStore) -> None:
    mv = _model(store, metrics={"macro_f1": 0.9}, dataset_version="d" * 64, run_id="r1")
    store.set_alias("vehicles", "production", 1)
    out = store.model_version_dict(store.resolve_model("vehicles:1"))
    expected = {
        "name",
        "version",
        "aliases",
        "metrics",
        "dataset_version",
        "run_id",
        "bundle_uri",
        "bundle_sha256",
        "created_at",
    }
    assert expected <= set(out)
    assert "id" not in out
    assert out["name"] == "vehicles" and out["version"] == mv.version == 1
    assert sorted(out["aliases"]) == ["candidate", "production"]
    assert out["metrics"] == {"macro_f1": 0.9}
    assert (out["dataset_version"], out["run_id"]) == ("d" * 64, "r1")
    assert datetime.fromisoformat(out["created_at"]).tzinfo is not None
    json.dumps(out)  # plain JSON


# -- connection errors (no db_url: these URLs are the point) -------------------------------
def test_unreachable_server_is_a_one_line_store_error() -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:1/x"
    with pytest.raises(StoreError) as info:
        MetadataStore(url)
    message = str(info.value)
    assert "\n" not in message
    assert "cannot reach the metadata store" in message
    assert url in message


@pytest.mark.parametrize("url", ["not a url at all", "nosuchdialect://host/db"])
def test_garbage_url_is_a_store_error(url: str) -> None:
    with pytest.raises(StoreError, match="metadata store URL"):
        MetadataStore(url)
