"""The migrations and the SQLAlchemy models describe the same schema, on both backends."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from loopline.drivers.metadata.models import Base
from loopline.drivers.metadata.store import MetadataStore


def test_the_migrated_schema_is_the_models_schema(db_url: str) -> None:
    store = MetadataStore(db_url)
    try:
        with store.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": False})
            diff = [d for d in compare_metadata(ctx, Base.metadata) if d[0] != "remove_table"
                    or d[1].name != "alembic_version"]  # fmt: skip
    finally:
        store.close()
    assert diff == []
