"""Shared fixtures: real PostgreSQL (its own database per test run), SQLite, tiny lakes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get(
    "LOOPLINE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"PostgreSQL is required in CI but unavailable: {reason}")
    pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is unavailable: {reason}")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    name = f"loopline_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as err:
        admin.dispose()
        _pg_unavailable(str(err.orig).strip().splitlines()[0])
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_schema_url(pg_url: str) -> Iterator[str]:
    """A PostgreSQL URL whose tables start empty: a fresh schema per test."""
    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:10]}"
    engine = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in pg_url else "?"
    try:
        yield f"{pg_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every metadata-store backend: the conformance suite runs once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'loopline.db'}"
    return str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture(scope="session")
def tiny_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic lake (with its deliberate defects), shared by the session."""
    from loopline.examples.vehicles.datagen import generate_lake

    out = tmp_path_factory.mktemp("lake")
    generate_lake(out, images=300, seed=7, cameras=2)
    return out


TINY_CONFIG = """\
project: tiny
model: {{name: tiny}}
store:
  metadata_url: {db}
  artifacts_url: {artifacts}
data:
  source: {{kind: lake, uri: {lake}}}
validate: {{max_quarantine_share: 0.3}}
train:
  input_size: 32
  depth: 2
  width: 8
  epochs: 1
  batch_size: 32
  search: {{space: {{lr: [0.01]}}}}
gate:
  rules: ["macro_precision >= 0.0"]
"""


@pytest.fixture
def project(tmp_path: Path, tiny_lake: Path) -> Path:
    """A project folder with a fast config over the tiny lake; returns the config path."""
    cfg = tmp_path / "loopline.yaml"
    cfg.write_text(
        TINY_CONFIG.format(
            db=f"sqlite:///{tmp_path / 'state' / 'loopline.db'}",
            artifacts=tmp_path / "state" / "artifacts",
            lake=tiny_lake,
        )
    )
    return cfg
