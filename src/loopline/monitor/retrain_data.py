"""What a retrain trains on and is judged on (``loopline.monitor.retrain``'s dataset side).

The training data is the incumbent's own, plus the labelled captures since: the retrain
config is the config the incumbent was built with (its ``data.also`` already lists the
captures ranges earlier retrains added), over the project's stores, environments and
monitor settings, with one captures range more and ``retrain.set`` on top. The new range
begins where the incumbent's last one ended (or when the incumbent was created). Its
newest labelled captures, at most ``retrain.holdout_max``, are held out of training to
gate the candidate; they are selected by time and count in SQL.

Retention must not purge what a loop still needs: the dataset step marks the training and
held-out captures with the loop's marker (``loop-<id>``), the build's dataset version
takes over the ones it ingested, and when the loop ends the marker is dropped (and, for a
candidate that was not released, its dataset's marks too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from loopline.clock import utc
from loopline.drivers.data.captures import PREFIX, parse_time
from loopline.errors import NotFound

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.metadata.loops import LoopRecord
    from loopline.drivers.metadata.models import ModelVersion
    from loopline.drivers.metadata.store import MetadataStore

# Sections a retrain takes from the project as it is now, not from the incumbent's build.
PROJECT_SECTIONS = ("store", "environments", "monitor")
_CHUNK = 500  # ids per IN (...) list


def loop_marker(loop_id: int) -> str:
    """The dataset-version mark that keeps a loop's captures from retention meanwhile."""
    return f"loop-{loop_id}"


# -- the retrain config ----------------------------------------------------------------------
def previous_config(config: Config, store: MetadataStore, mv: ModelVersion) -> dict[str, Any]:
    """The raw config ``mv`` was built with, with ``PROJECT_SECTIONS`` from ``config``
    (passwords masked); ``config``'s own when ``mv`` has no build run (imported)."""
    current = config.to_dict()
    run = None
    if mv.run_id:
        with contextlib.suppress(NotFound):
            run = store.runs.get(mv.run_id)
    if run is None or not run.config:
        return current
    return {**run.config, **{key: current[key] for key in PROJECT_SECTIONS if key in current}}


def new_data_since(raw: dict[str, Any], loop: LoopRecord, created_at: datetime) -> datetime:
    """Where the new captures begin: the end of the last captures range of the loop's
    environment and model in ``raw`` (an open-ended one ends at ``created_at``), else
    ``created_at`` (the incumbent's creation)."""
    ends = [
        parse_time(src.get("until"), "until") or utc(created_at)
        for src in (raw.get("data") or {}).get("also") or []
        if src.get("kind") == "captures"
        and src.get("environment") == loop.environment
        and src.get("model_name") in (None, loop.model_name)
    ]
    return max(ends, default=utc(created_at))


def retrain_config(config: Config, store: MetadataStore, loop: LoopRecord) -> Config:
    """The incumbent's build config plus the loop's captures range (``data.also``), the
    gate comparing against the environment's version, and ``retrain.set`` applied."""
    from loopline.config import apply_overrides, parse_config

    mv = store.models.get(loop.model_name, loop.incumbent_version)
    raw = previous_config(config, store, mv)
    extra = {
        "kind": "captures",
        "environment": loop.environment,
        "model_name": loop.model_name,
        "since": loop.state["since"],
        "until": loop.state["until"],
    }
    data = raw.setdefault("data", {})
    data["also"] = [*(data.get("also") or []), extra]
    if (raw.get("gate") or {}).get("compare_to") is not None:
        raw["gate"]["compare_to"] = loop.environment
    raw = apply_overrides(raw, list(config.monitor.retrain.set))
    what = f"the retrain config ({mv.name}:{mv.version}'s build config, monitor.retrain.set)"
    return parse_config(raw, config.root, what).with_credentials_from(config)


# -- labelled captures in SQL ----------------------------------------------------------------
def _labelled(loop: LoopRecord, since: datetime, labels: list[str], *columns: Any) -> Any:
    """The labelled captures ``CapturesSource`` lists for the loop, since ``since``, with a
    label in ``labels``."""
    from loopline.drivers.metadata.models import Capture, Feedback, Prediction

    return (
        select(*columns)
        .select_from(Capture)
        .join(Prediction, Prediction.id == Capture.prediction_id)
        .join(Feedback, Feedback.prediction_id == Capture.prediction_id)
        .where(Capture.environment == loop.environment)
        .where(Prediction.model_name == loop.model_name)
        .where(or_(Prediction.variant.is_(None), Prediction.variant != "shadow"))
        .where(Feedback.label.in_(labels))
        .where(Prediction.at >= since)
    )


def count_labelled(
    store: MetadataStore, loop: LoopRecord, since: datetime, labels: list[str]
) -> int:
    """How many captures since ``since`` carry a label in ``labels``."""
    with Session(store.engine) as s, s.begin():
        return int(s.scalar(_labelled(loop, since, labels, func.count())) or 0)


@dataclass(frozen=True)
class Holdout:
    """The newest labelled captures, kept out of training to gate the candidate."""

    until: datetime  # training takes what was predicted before; these from here on
    end: datetime  # the newest one's prediction time
    ids: list[str]  # prediction ids, oldest first


def _newest(store: MetadataStore, loop: LoopRecord, since: datetime, labels: list[str],
            limit: int) -> list[tuple[str, datetime]]:  # fmt: skip
    from loopline.drivers.metadata.models import Capture, Prediction

    q = _labelled(loop, since, labels, Capture.prediction_id, Prediction.at)
    q = q.order_by(Prediction.at.desc(), Capture.prediction_id.desc()).limit(limit)
    with Session(store.engine) as s, s.begin():
        return [(pid, utc(at)) for pid, at in s.execute(q)]


def select_holdout(
    store: MetadataStore,
    loop: LoopRecord,
    since: datetime,
    labels: list[str],
    count: int,
    cap: int,
) -> Holdout:
    """The newest ``count`` labelled captures since ``since`` (with those predicted at the
    same time as the oldest of them, up to ``cap`` in all)."""
    newest = _newest(store, loop, since, labels, count)
    if not newest:
        raise NotFound(f"no labelled captures of {loop.environment} since {since.isoformat()}")
    until = newest[-1][1]
    held = _newest(store, loop, until, labels, max(cap, count))
    return Holdout(until, held[0][1], [pid for pid, _ in reversed(held)])


def holdout_records(source: Any, ids: Iterable[str], labels: list[str]) -> Any:
    """The records of ``source`` (a bounded captures source) among ``ids``, label known."""
    records = source.list_records()
    wanted = {f"{PREFIX}{i}" for i in ids}
    held = records[records["path"].isin(wanted) & records["label"].isin(labels)]
    return held.reset_index(drop=True)


# -- retention marks ---------------------------------------------------------------------------
def remark(store: MetadataStore, ids: Iterable[str], old: str, new: str) -> int:
    """Mark ``ids`` as used by ``new`` where unmarked or marked ``old`` (one transaction,
    so retention never sees them unmarked); how many rows changed."""
    from loopline.drivers.metadata.models import Capture

    wanted = sorted(set(ids))
    changed = 0
    with store.session() as s:
        for i in range(0, len(wanted), _CHUNK):
            q = (
                update(Capture)
                .where(Capture.prediction_id.in_(wanted[i : i + _CHUNK]))
                .where(or_(Capture.dataset_version.is_(None), Capture.dataset_version == old))
                .values(dataset_version=new)
            )
            changed += int(getattr(s.execute(q), "rowcount", 0) or 0)
    return changed


def release_captures(store: MetadataStore, loop: LoopRecord) -> int:
    """Let retention have what an ended loop kept: its marker's captures always, and its
    dataset's when the candidate was not released and no other build made a version on
    that dataset. Returns how many captures were unmarked. Safe to call twice."""
    gone = store.captures.unmark(loop_marker(loop.id))
    dv = loop.dataset_version
    if loop.status in ("rejected", "failed") and dv and loop.run_id:
        users = [
            mv
            for mv in store.models.versions(loop.model_name, include_archived=True)
            if mv.dataset_version == dv
        ]
        if all(mv.run_id == loop.run_id for mv in users):
            gone += store.captures.unmark(dv)
    return gone
