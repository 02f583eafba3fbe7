"""The model registry: versions, aliases, archiving; every change audited.

Each change is one transaction that cannot interleave badly with another: registrations
of one name are serialised (an advisory lock on PostgreSQL, the write lock on SQLite),
alias moves are single upserts or compare-and-set statements, and an alias move, a
registration found equal to a version, and an archive of that version lock its row first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import AuditEvent, ModelAlias, ModelVersion, utcnow
from loopline.errors import AliasConflict, Conflict, NotFound


class _Unconditional(enum.Enum):
    UNCONDITIONAL = "unconditional"


UNCONDITIONAL: Literal[_Unconditional.UNCONDITIONAL] = _Unconditional.UNCONDITIONAL
"""``expected=UNCONDITIONAL``: move or delete an alias whatever it points at."""

Expected = int | None | Literal[_Unconditional.UNCONDITIONAL]


@dataclass(frozen=True)
class Registration:
    """What ``register`` did: the version, and whether it was created (False: a duplicate)."""

    version: ModelVersion
    created: bool


def parse_model_ref(ref: str) -> tuple[str, int | None, str | None]:
    """Split ``NAME``, ``NAME:VERSION`` or ``NAME@ALIAS`` into (name, version, alias)."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        if not name or not alias:
            raise NotFound(f"invalid model reference {ref!r}: use NAME, NAME:VERSION or NAME@ALIAS")
        return name, None, alias
    if ":" in ref:
        name, raw = ref.split(":", 1)
        if not raw.isdigit():
            raise NotFound(f"invalid model version {raw!r} in {ref!r}: versions are integers")
        return name, int(raw), None
    return ref, None, None


class ModelRegistry:
    """``store.models``: register, find, alias, archive model versions."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- versions ------------------------------------------------------------------------
    def register(
        self,
        name: str,
        *,
        bundle_uri: str,
        bundle_sha256: str,
        metrics: dict[str, Any] | None = None,
        dataset_version: str | None = None,
        run_id: str | None = None,
        lineage: dict[str, Any] | None = None,
        aliases: tuple[str, ...] = ("candidate",),
        actor: str = "loopline",
    ) -> Registration:
        """Register the next version of ``name`` and point ``aliases`` at it, atomically.

        A bundle equal (by sha256) to a version of ``name`` that is not archived registers
        nothing, moves no alias and returns that version with ``created=False``.
        """
        with self._db.write() as s:
            self._db.lock(s, f"loopline.model_versions:{name}")
            # The name's lock does not exclude an archive, which locks the version's row:
            # FOR SHARE waits for an archive in progress, and a row it archived no longer
            # matches. No LIMIT: with one, PostgreSQL may drop a row that stopped matching
            # without reading the next.
            same = s.scalars(
                select(ModelVersion)
                .where(
                    ModelVersion.name == name,
                    ModelVersion.bundle_sha256 == bundle_sha256,
                    ModelVersion.archived_at.is_(None),
                )
                .order_by(ModelVersion.version.desc())
                .with_for_update(read=True)
            ).first()
            if same is not None:
                return Registration(same, created=False)
            latest = s.scalar(
                select(func.max(ModelVersion.version)).where(ModelVersion.name == name)
            )
            row = ModelVersion(
                name=name,
                version=(latest or 0) + 1,
                bundle_uri=bundle_uri,
                bundle_sha256=bundle_sha256,
                metrics=metrics or {},
                dataset_version=dataset_version,
                run_id=run_id,
                lineage=lineage or {},
                created_at=utcnow(),
            )
            s.add(row)
            s.flush()
            for alias in aliases:
                self._upsert_alias(s, name, alias, row.version)
            _audit(
                s,
                actor,
                "model.register",
                f"{name}:{row.version}",
                aliases=list(aliases),
                run_id=run_id,
            )
        return Registration(row, created=True)

    def get(self, name: str, version: int | None = None, alias: str | None = None) -> ModelVersion:
        """A version by number (archived too), by alias, or the latest not archived."""
        with self._db.read() as s:
            if alias is not None:
                a = s.get(ModelAlias, (name, alias))
                if a is None:
                    raise NotFound(f"model {name!r} has no alias {alias!r}")
                version = a.version
            q = select(ModelVersion).where(ModelVersion.name == name)
            if version is not None:
                q = q.where(ModelVersion.version == version)
            else:
                q = q.where(ModelVersion.archived_at.is_(None))
            row = s.scalars(q.order_by(ModelVersion.version.desc()).limit(1)).first()
        if row is None:
            what = f"{name}:{version}" if version is not None else name
            raise NotFound(f"no model version {what} (see `loopline models`)")
        return row

    def resolve(self, ref: str) -> ModelVersion:
        """Resolve ``NAME``, ``NAME:VERSION`` or ``NAME@ALIAS``."""
        name, version, alias = parse_model_ref(ref)
        return self.get(name, version, alias)

    def versions(
        self, name: str | None = None, *, include_archived: bool = False
    ) -> list[ModelVersion]:
        """Versions by name and number; archived ones only with ``include_archived``."""
        q = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)
        if name is not None:
            q = q.where(ModelVersion.name == name)
        if not include_archived:
            q = q.where(ModelVersion.archived_at.is_(None))
        with self._db.read() as s:
            return list(s.scalars(q))

    def archive_version(self, name: str, version: int, *, actor: str = "loopline") -> ModelVersion:
        """Archive a version: hidden from listings, can hold no alias, still resolvable.

        Refuses (Conflict) while an alias points at it, naming the aliases.
        """
        with self._db.write() as s:
            row = _lock_version(s, name, version)
            held = sorted(
                s.scalars(
                    select(ModelAlias.alias).where(
                        ModelAlias.name == name, ModelAlias.version == version
                    )
                )
            )
            if held:
                raise Conflict(
                    f"{name}:{version} holds aliases {', '.join(held)}; move or delete them "
                    "before archiving it"
                )
            if row.archived_at is None:
                row.archived_at = utcnow()
                _audit(s, actor, "model.archive", f"{name}:{version}")
        return row

    def unarchive_version(
        self, name: str, version: int, *, actor: str = "loopline"
    ) -> ModelVersion:
        """Bring an archived version back into listings (and within reach of aliases)."""
        with self._db.write() as s:
            row = _lock_version(s, name, version)
            if row.archived_at is not None:
                row.archived_at = None
                _audit(s, actor, "model.unarchive", f"{name}:{version}")
        return row

    # -- aliases -------------------------------------------------------------------------
    def aliases(self, name: str | None = None) -> dict[tuple[str, int], list[str]]:
        """Map (name, version) to the aliases pointing at it."""
        q = select(ModelAlias).order_by(ModelAlias.alias)
        if name is not None:
            q = q.where(ModelAlias.name == name)
        out: dict[tuple[str, int], list[str]] = {}
        with self._db.read() as s:
            for a in s.scalars(q):
                out.setdefault((a.name, a.version), []).append(a.alias)
        return out

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        expected: Expected = UNCONDITIONAL,
        actor: str = "loopline",
    ) -> None:
        """Point ``alias`` at ``name:version``, optionally only from an ``expected`` state.

        ``expected`` is the version the alias must point at now, or None when it must not
        exist yet; otherwise AliasConflict is raised and nothing changes.
        """
        with self._db.write() as s:
            row = _lock_version(s, name, version, share=True)
            if row.archived_at is not None:
                raise Conflict(
                    f"{name}:{version} is archived and cannot hold an alias; unarchive it first"
                )
            previous = _alias_version(s, name, alias, lock=True)
            if expected is UNCONDITIONAL:
                self._upsert_alias(s, name, alias, version)
            elif expected is None:
                stmt = self._db.insert(ModelAlias).values(
                    name=name, alias=alias, version=version, updated_at=utcnow()
                )
                stmt = stmt.on_conflict_do_nothing(index_elements=["name", "alias"])
                # INSERT rowcounts are only read when asked for (and DO NOTHING sets it to 0).
                stmt = stmt.execution_options(preserve_rowcount=True)
                if s.connection().execute(stmt).rowcount != 1:
                    raise _conflict(name, alias, expected, _alias_version(s, name, alias))
            else:
                result = s.connection().execute(
                    update(ModelAlias)
                    .where(
                        ModelAlias.name == name,
                        ModelAlias.alias == alias,
                        ModelAlias.version == expected,
                    )
                    .values(version=version, updated_at=utcnow())
                )
                if result.rowcount != 1:
                    raise _conflict(name, alias, expected, _alias_version(s, name, alias))
                previous = expected
            _audit(s, actor, "model.alias", f"{name}:{version}", alias=alias, previous=previous)

    def delete_alias(
        self,
        name: str,
        alias: str,
        *,
        expected: int | Literal[_Unconditional.UNCONDITIONAL] = UNCONDITIONAL,
        actor: str = "loopline",
    ) -> int:
        """Remove ``alias`` (only while it points at ``expected`` when given); returns the
        version it pointed at."""
        cond = [ModelAlias.name == name, ModelAlias.alias == alias]
        if expected is not UNCONDITIONAL:
            cond.append(ModelAlias.version == expected)
        with self._db.write() as s:
            version = s.scalar(delete(ModelAlias).where(*cond).returning(ModelAlias.version))
            if version is None:
                current = _alias_version(s, name, alias)
                if current is None:
                    raise NotFound(f"model {name!r} has no alias {alias!r}")
                raise _conflict(name, alias, expected, current)
            _audit(s, actor, "model.alias.delete", f"{name}:{version}", alias=alias)
        return int(version)

    def as_dict(self, mv: ModelVersion) -> dict[str, Any]:
        """The JSON form of a model version, aliases included (the CLI's contract)."""
        out = mv.to_dict()
        out.pop("id", None)
        out["aliases"] = self.aliases(mv.name).get((mv.name, mv.version), [])
        return out

    def _upsert_alias(self, s: Session, name: str, alias: str, version: int) -> None:
        now = utcnow()
        stmt = self._db.insert(ModelAlias).values(
            name=name, alias=alias, version=version, updated_at=now
        )
        s.execute(
            stmt.on_conflict_do_update(
                index_elements=["name", "alias"], set_={"version": version, "updated_at": now}
            )
        )


def _lock_version(s: Session, name: str, version: int, *, share: bool = False) -> ModelVersion:
    """The version's row, locked until this transaction ends, so an alias move onto it
    (``share``: moves do not exclude each other) and its archive cannot interleave.

    PostgreSQL locks the row; SQLite's write transactions are serial anyway.
    """
    q = (
        select(ModelVersion)
        .where(ModelVersion.name == name, ModelVersion.version == version)
        .with_for_update(read=share)
    )
    row = s.scalars(q).first()
    if row is None:
        raise NotFound(f"no model version {name}:{version} (see `loopline models`)")
    return row


def _alias_version(s: Session, name: str, alias: str, *, lock: bool = False) -> int | None:
    """The version ``alias`` points at now (``lock``: and hold it until the transaction ends)."""
    q = select(ModelAlias.version).where(ModelAlias.name == name, ModelAlias.alias == alias)
    return s.scalar(q.with_for_update() if lock else q)


def _conflict(name: str, alias: str, expected: Expected, current: int | None) -> AliasConflict:
    now = f"points at {name}:{current}" if current is not None else "does not exist"
    want = f"{name}:{expected}" if expected is not None else "nothing (a new alias)"
    return AliasConflict(
        f"alias {name}@{alias} {now}, but the change expected {want}; "
        "read the current aliases (`loopline models`) and retry"
    )


def _audit(s: Session, actor: str, action: str, subject: str, **details: Any) -> None:
    s.add(AuditEvent(actor=actor, action=action, subject=subject, details=details))
