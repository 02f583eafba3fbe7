"""Conformance suite of the metadata store: every test runs on SQLite and on PostgreSQL.

Races between concurrent callers are in ``tests/drivers/metadata/``, on the same backends.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import inspect, text

from loopline.drivers.metadata.database import safe_url
from loopline.drivers.metadata.models import ModelVersion, PipelineRun
from loopline.drivers.metadata.registry import Registration
from loopline.drivers.metadata.store import MIGRATIONS, MetadataStore
from loopline.errors import AliasConflict, Conflict, NotFound, StoreError

CORE_TABLES = {
    "dataset_versions",
    "pipeline_runs",
    "step_runs",
    "hpo_trials",
    "model_versions",
    "model_aliases",
    "audit_log",
    "predictions",
    "feedback",
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


_bundles = iter(range(10**6))


def _register(store: MetadataStore, name: str = "vehicles", **fields: Any) -> Registration:
    """Register a version; each call gets a distinct bundle unless ``bundle_sha256`` is given."""
    fields.setdefault("bundle_uri", f"/artifacts/{name}.tar")
    fields.setdefault("bundle_sha256", f"{next(_bundles):064x}")
    return store.models.register(name, **fields)


def _model(store: MetadataStore, name: str = "vehicles", **fields: Any) -> ModelVersion:
    return _register(store, name, **fields).version


def _run(store: MetadataStore, run_id: str) -> PipelineRun:
    return store.runs.create(run_id, pipeline="build", project="tiny", config={"a": 1})


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
    columns = {c["name"] for c in inspect(store.engine).get_columns("model_versions")}
    assert "archived_at" in columns


def test_opening_twice_is_idempotent_and_keeps_data(db_url: str) -> None:
    first = MetadataStore(db_url)
    _run(first, "r1")
    first.close()
    second = MetadataStore(db_url)
    try:
        assert second.runs.get("r1").id == "r1"
        with second.engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars()
            assert list(versions) == [_alembic_head()]
    finally:
        second.close()


@pytest.mark.parametrize("start", ["0001", "0002"])
def test_an_older_schema_is_upgraded_on_open_keeping_its_models(db_url: str, start: str) -> None:
    from alembic import command
    from alembic.config import Config

    bare = MetadataStore(db_url, migrate=False)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with bare.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, start)
        conn.execute(
            text(
                "INSERT INTO model_versions (name, version, metrics, bundle_uri, bundle_sha256,"
                " lineage, created_at) VALUES ('old', 1, '{}', 'u', 's', '{}', :t)"
            ),
            {"t": datetime(2026, 1, 1)},
        )
    bare.close()
    store = MetadataStore(db_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == (
                _alembic_head()
            )
        old = store.models.get("old", 1)
        assert old.archived_at is None
        assert [m.name for m in store.models.versions()] == ["old"]
    finally:
        store.close()


# -- datasets ----------------------------------------------------------------------------
def test_dataset_versions_are_idempotent_and_found_by_prefix(store: MetadataStore) -> None:
    fields: dict[str, Any] = dict(
        name="tiny", source_uri="/lake", n_records=3, records_sha256="0" * 64, stats={"n": 3}
    )
    a = store.datasets.add(version="abc123" + "0" * 58, **fields)
    again = store.datasets.add(version=a.version, **{**fields, "n_records": 99})
    assert again.n_records == 3
    store.datasets.add(version="abd456" + "0" * 58, **fields)
    assert len(store.datasets.all()) == 2
    assert store.datasets.get("abc1").version == a.version
    assert store.datasets.get(a.version).stats == {"n": 3}
    with pytest.raises(NotFound, match="ab"):
        store.datasets.get("ab")  # ambiguous prefix
    with pytest.raises(NotFound, match="zzz"):
        store.datasets.get("zzz")


# -- runs --------------------------------------------------------------------------------
def test_runs_create_update_get_list(store: MetadataStore) -> None:
    run = _run(store, "20260101-000000-aaaaaa")
    assert run.status == "running"
    _run(store, "20260101-000001-bbbbbb")
    store.runs.update("20260101-000000-aaaaaa", status="failed", error="boom", dataset_version="d1")
    got = store.runs.get("20260101-000000-aaaaaa")
    assert (got.status, got.error, got.dataset_version) == ("failed", "boom", "d1")
    assert got.config == {"a": 1}
    assert got.pipeline == "build" and got.project == "tiny"
    assert store.runs.get("20260101-000001").id == "20260101-000001-bbbbbb"
    assert {r.id for r in store.runs.recent()} == {
        "20260101-000000-aaaaaa",
        "20260101-000001-bbbbbb",
    }
    assert len(store.runs.recent(limit=1)) == 1


def test_unknown_or_ambiguous_run_is_not_found(store: MetadataStore) -> None:
    _run(store, "r-one")
    _run(store, "r-two")
    with pytest.raises(NotFound, match="loopline runs"):
        store.runs.get("nope")
    with pytest.raises(NotFound):
        store.runs.get("r-")


def test_a_running_run_whose_process_is_gone_is_interrupted(store: MetadataStore) -> None:
    _run(store, "dead")
    _run(store, "alive")
    _run(store, "elsewhere")
    store.runs.update("dead", pid=_dead_pid(), host=socket.gethostname())
    store.runs.update("elsewhere", pid=_dead_pid(), host="another-host.example")
    assert store.runs.get("dead").status == "interrupted"
    assert store.runs.get("alive").status == "running"  # this process
    assert store.runs.get("elsewhere").status == "running"  # cannot tell from here
    statuses = {r.id: r.status for r in store.runs.recent()}
    assert statuses == {"dead": "interrupted", "alive": "running", "elsewhere": "running"}


def test_claim_takes_over_failed_interrupted_and_dead_runs_only(store: MetadataStore) -> None:
    for run_id in ("failed", "interrupted", "dead", "alive", "elsewhere", "done"):
        _run(store, run_id)
    store.runs.update("failed", status="failed", error="boom", pid=1, host="old-host")
    store.runs.update("interrupted", status="interrupted")
    store.runs.update("dead", pid=_dead_pid(), host=socket.gethostname())
    store.runs.update("elsewhere", pid=_dead_pid(), host="another-host.example")
    store.runs.update("done", status="succeeded")
    for run_id in ("failed", "interrupted", "dead"):
        claim = store.runs.claim(run_id)
        assert claim.won, run_id
        run = claim.run
        assert (run.status, run.error, run.finished_at) == ("running", None, None)
        assert (run.pid, run.host) == (__import__("os").getpid(), socket.gethostname())
        assert not store.runs.claim(run_id).won  # now held by this (live) process
    for run_id, status in (("alive", "running"), ("elsewhere", "running"), ("done", "succeeded")):
        claim = store.runs.claim(run_id)
        assert not claim.won and claim.run.status == status, run_id
    assert store.runs.get("elsewhere").host == "another-host.example"  # untouched
    with pytest.raises(NotFound):
        store.runs.claim("nope")


# -- steps -------------------------------------------------------------------------------
def test_steps_start_finish_and_cache_lookup(store: MetadataStore) -> None:
    _run(store, "r1")
    common: dict[str, Any] = dict(cache_key="k" * 64, code_version="c" * 64, params={"x": 1})
    first = store.steps.start("r1", "train", **common)
    assert store.steps.find_cached("train", "k" * 64) is None  # still running
    store.steps.finish(first, status="succeeded", outputs={"model": {"sha256": "1"}})
    second = store.steps.start("r1", "train", **common)
    store.steps.finish(second, status="succeeded", outputs={"model": {"sha256": "2"}})
    failed = store.steps.start("r1", "train", **common)
    store.steps.finish(failed, status="failed", error="boom")

    hit = store.steps.find_cached("train", "k" * 64)
    assert hit is not None and hit.id == second and hit.outputs == {"model": {"sha256": "2"}}
    assert store.steps.find_cached("train", "other") is None
    assert store.steps.find_cached("evaluate", "k" * 64) is None

    steps = store.steps.for_run("r1")
    assert [s.id for s in steps] == [first, second, failed]
    assert [s.status for s in steps] == ["succeeded", "succeeded", "failed"]
    assert steps[2].error == "boom"
    assert steps[0].finished_at is not None
    assert steps[0].duration_s is not None and steps[0].duration_s >= 0
    with pytest.raises(NotFound):
        store.steps.finish(10**6, status="succeeded")


# -- trials ------------------------------------------------------------------------------
def test_trials_are_recorded_replaced_and_listed(store: MetadataStore) -> None:
    _run(store, "r1")
    store.trials.record("r1", 1, state="complete", params={"lr": 0.1}, value=0.5, epochs=2)
    store.trials.record("r1", 0, state="pruned", params={"lr": 0.3}, value=0.1, epochs=1)
    store.trials.record("r1", 1, state="complete", params={"lr": 0.1}, value=0.7, epochs=3)
    trials = store.trials.for_run("r1")
    assert [(t.number, t.state, t.value, t.epochs) for t in trials] == [
        (0, "pruned", 0.1, 1),
        (1, "complete", 0.7, 3),
    ]
    assert store.trials.for_run("other") == []


# -- models ------------------------------------------------------------------------------
def test_register_gives_increasing_versions_and_moves_candidate(store: MetadataStore) -> None:
    versions = [_model(store, metrics={"f1": i / 10}).version for i in range(3)]
    assert versions == [1, 2, 3]
    assert _model(store, "other").version == 1
    assert store.models.aliases("vehicles") == {("vehicles", 3): ["candidate"]}
    assert store.models.resolve("vehicles@candidate").version == 3
    no_alias = _model(store, aliases=())
    assert no_alias.version == 4
    assert store.models.resolve("vehicles@candidate").version == 3
    assert [m.version for m in store.models.versions("vehicles")] == [1, 2, 3, 4]
    assert len(store.models.versions()) == 5


def test_registering_an_equal_bundle_registers_nothing(store: MetadataStore) -> None:
    first = _register(store, bundle_sha256="ab" * 32)
    assert first.created and first.version.version == 1
    store.models.set_alias("vehicles", "production", 1)
    _register(store, bundle_sha256="cd" * 32)  # vehicles:2, now the candidate
    again = _register(store, bundle_sha256="ab" * 32, run_id="r9")
    assert not again.created
    assert again.version.version == 1 and again.version.run_id is None
    assert [m.version for m in store.models.versions("vehicles")] == [1, 2]
    assert store.models.resolve("vehicles@candidate").version == 2  # no alias moved
    assert [e.action for e in store.audit.recent()].count("model.register") == 2
    other = _register(store, "other", bundle_sha256="ab" * 32)  # per name
    assert other.created and other.version.version == 1


def test_an_archived_version_does_not_absorb_an_equal_bundle(store: MetadataStore) -> None:
    _register(store, bundle_sha256="ab" * 32, aliases=())
    store.models.archive_version("vehicles", 1)
    again = _register(store, bundle_sha256="ab" * 32)
    assert again.created and again.version.version == 2


def test_resolve_model_refs(store: MetadataStore) -> None:
    for _ in range(3):
        _model(store)
    store.models.set_alias("vehicles", "production", 2)
    assert store.models.resolve("vehicles").version == 3
    assert store.models.resolve("vehicles:1").version == 1
    assert store.models.resolve("vehicles@production").version == 2
    assert store.models.resolve("vehicles@candidate").version == 3


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
            store.models.resolve(ref)


def test_set_alias_on_a_missing_version_is_not_found(store: MetadataStore) -> None:
    _model(store)
    with pytest.raises(NotFound, match="vehicles:7"):
        store.models.set_alias("vehicles", "production", 7)
    with pytest.raises(NotFound):
        store.models.set_alias("nope", "production", 1)
    assert store.models.aliases("vehicles") == {("vehicles", 1): ["candidate"]}


def test_compare_and_set_alias_moves(store: MetadataStore) -> None:
    for _ in range(3):
        _model(store, aliases=())
    store.models.set_alias("vehicles", "production", 1, expected=None)  # must not exist
    with pytest.raises(AliasConflict, match=r"vehicles@production points at vehicles:1"):
        store.models.set_alias("vehicles", "production", 2, expected=None)
    store.models.set_alias("vehicles", "production", 2, expected=1)
    with pytest.raises(AliasConflict, match=r"points at vehicles:2.*expected vehicles:1"):
        store.models.set_alias("vehicles", "production", 3, expected=1)
    with pytest.raises(AliasConflict, match="does not exist"):
        store.models.set_alias("vehicles", "staging", 3, expected=2)
    assert store.models.aliases("vehicles") == {("vehicles", 2): ["production"]}
    assert AliasConflict.exit_code == 1 and issubclass(AliasConflict, Conflict)
    moves = [e for e in store.audit.recent() if e.action == "model.alias"]
    assert [(e.subject, e.details) for e in moves] == [
        ("vehicles:2", {"alias": "production", "previous": 1}),
        ("vehicles:1", {"alias": "production", "previous": None}),
    ]


def test_delete_alias(store: MetadataStore) -> None:
    _model(store, aliases=("candidate", "production"))
    _model(store, aliases=())
    with pytest.raises(AliasConflict, match="points at vehicles:1"):
        store.models.delete_alias("vehicles", "production", expected=2)
    assert store.models.delete_alias("vehicles", "production", expected=1, actor="bob") == 1
    assert store.models.delete_alias("vehicles", "candidate") == 1
    assert store.models.aliases("vehicles") == {}
    with pytest.raises(NotFound, match="has no alias 'candidate'"):
        store.models.delete_alias("vehicles", "candidate")
    with pytest.raises(NotFound, match="has no alias 'candidate'"):
        store.models.resolve("vehicles@candidate")
    events = [e for e in store.audit.recent() if e.action == "model.alias.delete"]
    assert [(e.actor, e.subject, e.details) for e in events] == [
        ("loopline", "vehicles:1", {"alias": "candidate"}),
        ("bob", "vehicles:1", {"alias": "production"}),
    ]


def test_archive_and_unarchive_a_version(store: MetadataStore) -> None:
    _model(store, aliases=("production", "staging"))  # vehicles:1
    _model(store)  # vehicles:2, candidate
    with pytest.raises(Conflict, match=r"vehicles:1 holds aliases production, staging"):
        store.models.archive_version("vehicles", 1)
    store.models.delete_alias("vehicles", "production")
    store.models.delete_alias("vehicles", "staging")
    archived = store.models.archive_version("vehicles", 1, actor="alice")
    assert archived.archived_at is not None
    assert [m.version for m in store.models.versions("vehicles")] == [2]
    assert [m.version for m in store.models.versions(include_archived=True)] == [1, 2]
    assert store.models.resolve("vehicles:1").archived_at is not None  # lineage still resolves
    assert store.models.as_dict(store.models.get("vehicles", 1))["archived_at"] is not None
    with pytest.raises(Conflict, match="vehicles:1 is archived"):
        store.models.set_alias("vehicles", "production", 1)
    assert store.models.aliases("vehicles") == {("vehicles", 2): ["candidate"]}

    store.models.archive_version("vehicles", 1)  # archiving twice: a no-op, not audited
    store.models.delete_alias("vehicles", "candidate")
    store.models.archive_version("vehicles", 2)
    with pytest.raises(NotFound, match="no model version vehicles "):
        store.models.resolve("vehicles")  # every version archived: no latest

    store.models.unarchive_version("vehicles", 1, actor="bob")
    assert store.models.resolve("vehicles").version == 1
    store.models.set_alias("vehicles", "production", 1)
    with pytest.raises(NotFound, match="vehicles:9"):
        store.models.archive_version("vehicles", 9)
    actions = [(e.actor, e.action, e.subject) for e in store.audit.recent()]
    assert actions[:4] == [
        ("loopline", "model.alias", "vehicles:1"),
        ("bob", "model.unarchive", "vehicles:1"),
        ("loopline", "model.archive", "vehicles:2"),
        ("loopline", "model.alias.delete", "vehicles:2"),
    ]
    assert [a for _, a, s in actions if s == "vehicles:1"].count("model.archive") == 1


def test_latest_skips_archived_versions(store: MetadataStore) -> None:
    _model(store, aliases=())
    _model(store, aliases=())
    store.models.archive_version("vehicles", 2)
    assert store.models.resolve("vehicles").version == 1
    assert store.models.get("vehicles").version == 1


def test_audit_log_records_register_and_alias(store: MetadataStore) -> None:
    _model(store, run_id="r1", actor="alice")
    store.models.set_alias("vehicles", "production", 1, actor="bob")
    store.audit.record("carol", "run.resume", "r1", note="x")
    events = store.audit.recent()
    assert [(e.actor, e.action, e.subject) for e in events] == [
        ("carol", "run.resume", "r1"),
        ("bob", "model.alias", "vehicles:1"),
        ("alice", "model.register", "vehicles:1"),
    ]
    assert events[1].details == {"alias": "production", "previous": None}
    assert events[2].details == {"aliases": ["candidate"], "run_id": "r1"}
    assert events[0].details == {"note": "x"}
    assert len(store.audit.recent(limit=1)) == 1


def test_model_version_dict_is_the_cli_contract(store: MetadataStore) -> None:
    mv = _model(store, metrics={"macro_f1": 0.9}, dataset_version="d" * 64, run_id="r1")
    store.models.set_alias("vehicles", "production", 1)
    out = store.models.as_dict(store.models.resolve("vehicles:1"))
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
        "archived_at",
    }
    assert expected <= set(out)
    assert "id" not in out
    assert out["name"] == "vehicles" and out["version"] == mv.version == 1
    assert sorted(out["aliases"]) == ["candidate", "production"]
    assert out["metrics"] == {"macro_f1": 0.9}
    assert (out["dataset_version"], out["run_id"]) == ("d" * 64, "r1")
    assert datetime.fromisoformat(out["created_at"]).tzinfo is not None
    assert out["archived_at"] is None
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


@pytest.mark.parametrize(
    "url",
    [
        "postgres ql://user:s3cret@host/db",  # SQLAlchemy cannot parse it
        "nosuchdialect://user:s3cret@host/db",
        "postgresql+nosuchdriver://user:p@s3cret@host/db",  # '@' in the password
    ],
)
def test_a_bad_url_never_shows_its_password(url: str) -> None:
    with pytest.raises(StoreError, match="metadata store URL") as info:
        MetadataStore(url)
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
    assert "s3cret" not in safe_url(url)
