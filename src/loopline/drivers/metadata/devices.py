"""Edge devices: the version each one runs, its latest telemetry, and its telemetry history.

A device is known by (environment, device_id). Every heartbeat upserts its row (the first
one sets ``first_seen``); telemetry samples are appended to ``telemetry``, many in one
write. The edge hub writes both, from HTTP reports and from MQTT messages (``via``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update

from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import Device, TelemetrySample, utcnow

VIA = ("http", "mqtt")
Rows = list[dict[str, Any]]
STATUS_MAX = 16  # the width of devices.status


def _utc(ts: datetime) -> datetime:
    """An aware UTC time (SQLite hands back naive ones; naive input is taken as UTC)."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _iso(ts: datetime | None) -> str | None:
    return _utc(ts).isoformat() if ts is not None else None


def _device_dict(row: Device) -> dict[str, Any]:
    # ``env``/``version`` for `loopline deployments`, the column names for everything else.
    return {
        "env": row.environment,
        "environment": row.environment,
        "device_id": row.device_id,
        "model_name": row.model_name,
        "version": row.model_version,
        "model_version": row.model_version,
        "status": row.status,
        "host": row.host,
        "via": row.via,
        "info": dict(row.info or {}),
        "telemetry": dict(row.telemetry or {}),
        "first_seen": _iso(row.first_seen),
        "last_seen": _iso(row.last_seen),
    }


def _check_via(via: str) -> None:
    if via not in VIA:
        raise ValueError(f"via {via!r}: allowed {', '.join(VIA)}")


class DeviceRepository:
    """``store.devices``: heartbeats and telemetry of edge devices."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def heartbeat(
        self,
        environment: str,
        device_id: str,
        *,
        model_name: str | None,
        version: int | None,
        status: str,
        host: str | None = None,
        info: dict[str, Any] | None = None,
        telemetry: dict[str, Any] | None = None,
        via: str = "http",
    ) -> None:
        """Upsert the device's row: what it runs, its status and latest telemetry, now."""
        _check_via(via)
        if not status or len(status) > STATUS_MAX:
            raise ValueError(f"device status {status!r}: 1 to {STATUS_MAX} characters")
        now = utcnow()
        values = {
            "model_name": model_name,
            "model_version": version,
            "status": status,
            "host": host,
            "info": info or {},
            "telemetry": telemetry or {},
            "via": via,
            "last_seen": now,
        }
        stmt = self._db.insert(Device).values(
            environment=environment, device_id=device_id, first_seen=now, **values
        )
        stmt = stmt.on_conflict_do_update(index_elements=["environment", "device_id"], set_=values)
        with self._db.write() as s:
            s.execute(stmt)

    upsert = heartbeat

    def set_status(self, environment: str, device_id: str, status: str, *, via: str) -> bool:
        """Change a known device's status only (an MQTT last will: ``offline``)."""
        _check_via(via)
        with self._db.write() as s:
            q = (
                update(Device)
                .where(Device.environment == environment, Device.device_id == device_id)
                .values(status=status[:STATUS_MAX], via=via)
            )
            return bool(getattr(s.execute(q), "rowcount", 0))

    def record_telemetry(self, samples: list[dict[str, Any]]) -> int:
        """Append telemetry samples in one write; returns how many.

        Each sample is a dict with ``environment``, ``device_id``, ``via``, ``metrics`` and
        optionally ``at`` (a datetime; default now) and ``model_version``.
        """
        if not samples:
            return 0
        now = utcnow()
        rows = []
        for sample in samples:
            _check_via(sample["via"])
            at = sample.get("at")
            rows.append(
                {
                    "environment": sample["environment"],
                    "device_id": sample["device_id"],
                    "at": _utc(at) if isinstance(at, datetime) else now,
                    "via": sample["via"],
                    "model_version": sample.get("model_version"),
                    "metrics": dict(sample.get("metrics") or {}),
                }
            )
        with self._db.write() as s:
            s.execute(insert(TelemetrySample), rows)
        return len(rows)

    def get(self, environment: str, device_id: str) -> dict[str, Any] | None:
        with self._db.read() as s:
            row = s.get(Device, (environment, device_id))
            return _device_dict(row) if row is not None else None

    def list(self, environment: str | None = None) -> Rows:
        """Devices as plain dicts (``env``, ``device_id``, ``version``, ``status``,
        ``last_seen``, ``via``, ...), by environment then device id."""
        q = select(Device).order_by(Device.environment, Device.device_id)
        if environment is not None:
            q = q.where(Device.environment == environment)
        with self._db.read() as s:
            return [_device_dict(r) for r in s.scalars(q)]

    def telemetry(
        self,
        environment: str,
        device_id: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> Rows:
        """Telemetry samples, oldest first; with ``limit``, the latest ``limit`` of them."""
        q = select(TelemetrySample).where(TelemetrySample.environment == environment)
        if device_id is not None:
            q = q.where(TelemetrySample.device_id == device_id)
        if since is not None:
            q = q.where(TelemetrySample.at >= _utc(since))
        q = q.order_by(TelemetrySample.at.desc(), TelemetrySample.id.desc())
        if limit is not None:
            q = q.limit(limit)
        with self._db.read() as s:
            rows = list(s.scalars(q))
        rows.reverse()
        return [
            {
                "env": r.environment,
                "device_id": r.device_id,
                "at": _iso(r.at),
                "via": r.via,
                "version": r.model_version,
                "metrics": dict(r.metrics or {}),
            }
            for r in rows
        ]
