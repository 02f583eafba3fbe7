"""The loop an alert starts (retrain, approve, notify), as a resumable state machine.

``start`` records one loop per alert (``store.loops``: the unique alert id makes a second
start return the first loop), and one open retrain per model and environment (the unique
open key: a second retrain started meanwhile, by this monitor or another, only tells the
owner). ``advance`` claims the loop for its caller and runs its steps until one must wait
(for labels, a person, a canary's verdict, a busy staging) or the loop ends; every step
leaves its result in the loop row before the next begins, so a process killed at any point
is followed by one that resumes where it stopped. ``decide`` records a person's approval
or rejection. The steps themselves are in ``loopline.monitor.retrain``::

    dataset -> build -> gate -> [approval] -> replica -> release -> canary -> done

Statuses: ``running``, ``waiting_approval``, and the final ``succeeded``, ``rejected`` (the
candidate was not good enough, or a person said no: production keeps the incumbent) and
``failed`` (something broke, or the canary was rolled back). Nothing here imports torch:
the build step runs the project's Build pipeline, which needs the train extra.

No loop waits for ever: one whose alert resolved before its build began ends (nothing to
fix); one short of labels after ``retrain.labels_timeout_s``, or waiting for a person
after ``retrain.approval_timeout_s``, gives up; ``loopline reject`` ends any loop that has
not begun its release; a step that keeps crashing fails the loop after ``MAX_FAILURES``
tries in a row.

The steps that make the candidate are in ``loopline.monitor.retrain``; those that release
it (replica, release, canary) in ``loopline.monitor.release_steps``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopline.clock import now as _now
from loopline.clock import parse, utc
from loopline.drivers.metadata.loops import (
    OPEN_STATUSES,
    AlertNote,
    LoopBusy,
    LoopNotHeld,
    LoopRecord,
    open_key,
)
from loopline.errors import ConfigError, Conflict, LooplineError, NotFound, StoreError
from loopline.monitor.release_steps import canary, release, replica
from loopline.monitor.retrain import ACTOR, LoopContext, StepFn, candidate_steps

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.alerts import AlertRecord
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.pipeline.step import Reporter

__all__ = ["ACTOR", "MAX_FAILURES", "advance", "decide", "open_loops", "start"]

LOOP_ACTIONS = ("retrain", "approve", "notify")
RETRAINING = ("retrain", "approve")
MAX_FAILURES = 5  # a step that crashed this many times in a row fails the loop
RESOLVED = "the alert resolved before the retrain started"
# The steps a person's rejection still ends; a release under way is undone by a rollback.
REJECTABLE = ("dataset", "build", "gate", "approval", "replica")
# How long a loop may wait at a step: the retrain policy's field, the status it ends with,
# and what it says (None: why it waited).
DEADLINES: dict[str, tuple[str, str, str | None]] = {
    "dataset": ("labels_timeout_s", "failed", None),
    "approval": ("approval_timeout_s", "rejected", "nobody approved or rejected it"),
}


def _incumbent(store: MetadataStore, alert: AlertRecord) -> int | None:
    """The version the alert is about; else the one its environment serves."""
    if alert.model_version is not None:
        return alert.model_version
    dep = store.deployments.get(alert.environment)
    if dep is not None and dep.model_name == alert.model_name:
        return dep.stable_version
    return None


def _end_if_resolved(store: MetadataStore, loop: LoopRecord) -> LoopRecord | None:
    """End ``loop`` when its alert resolved before its build began (None otherwise)."""
    if loop.status != "running" or loop.step != "dataset":
        return None
    alert = store.alerts.get(loop.alert_id)
    if alert is None or alert.state != "resolved":
        return None
    return store.loops.transition(
        loop.id,
        "running",
        steps=["dataset"],
        event={"step": "dataset", "status": "succeeded", "detail": RESOLVED},
        notes=[AlertNote("loop.succeeded", RESOLVED)],
        status="succeeded",
        step="done",
        reason=RESOLVED,
        finished_at=_now(),
        state={**loop.state, "skipped": True, "resolved": True},
    )


def _busy(store: MetadataStore, alert: AlertRecord, cooldown_s: float) -> LoopRecord | None:
    """Another retrain of this model and environment: open, or started within the cooldown
    (an open one whose alert resolved before its build began ends now, and does not count)."""
    since = _now() - timedelta(seconds=cooldown_s)
    for other in store.loops.list(model_name=alert.model_name, environment=alert.environment):
        if other.alert_id == alert.id or other.action not in RETRAINING:
            continue
        if other.state.get("imported") or other.state.get("skipped"):
            continue
        if other.is_open and _end_if_resolved(store, other) is not None:
            continue
        if other.is_open or (other.started_at is not None and other.started_at >= since):
            return other
    return None


def _skipped(alert: AlertRecord, busy: LoopRecord, config: Config) -> dict[str, Any]:
    who = config.monitor.owner or "the owner"
    reason = (
        f"no retrain: loop {busy.id} (alert {busy.alert_id}) already retrains "
        f"{alert.model_name} for {alert.environment} ({busy.status}, started "
        f"{busy.started_at.isoformat() if busy.started_at else '?'}; retrain.cooldown_s "
        f"{config.monitor.retrain.cooldown_s:g}); {who} told"
    )
    return {"status": "succeeded", "step": "done", "reason": reason, "detail": reason,
            "state": {"skipped": True, "other_loop": busy.id}}  # fmt: skip


def _plan(store: MetadataStore, alert: AlertRecord, config: Config) -> dict[str, Any]:
    """What the alert's loop starts as: status, step, state, reason, detail (and key)."""
    incumbent = _incumbent(store, alert)
    ref = f"{alert.model_name}:{incumbent}" if incumbent is not None else alert.model_name
    who = config.monitor.owner or "the owner"
    if alert.action == "notify":
        detail = f"{who} told of alert {alert.id} ({alert.condition}); no retrain (action notify)"
        return {"status": "succeeded", "step": "done", "detail": detail, "reason": None,
                "state": {}, "incumbent": incumbent}  # fmt: skip
    imported = False
    if incumbent is not None:
        with contextlib.suppress(NotFound):
            mv = store.models.get(alert.model_name, incumbent)
            imported = bool((mv.lineage or {}).get("imported"))
    if imported:
        reason = (
            f"{ref} was imported (trained elsewhere): Loopline cannot retrain it; retrain it "
            f"where it was trained and import the new version, then `loopline approve "
            f"{alert.id}` to close this loop (or `loopline reject {alert.id} --reason ...`)"
        )
        return {"status": "waiting_approval", "step": "approval", "detail": reason,
                "reason": reason, "state": {"imported": True}, "incumbent": incumbent}  # fmt: skip
    busy = _busy(store, alert, config.monitor.retrain.cooldown_s)
    if busy is not None:
        return {**_skipped(alert, busy, config), "incumbent": incumbent}
    detail = f"retrain {ref} for {alert.environment} (alert {alert.id}: {alert.condition})"
    return {"status": "running", "step": "dataset", "detail": detail, "reason": None,
            "state": {}, "incumbent": incumbent,
            "key": open_key(alert.model_name, alert.environment)}  # fmt: skip


def _create(store: MetadataStore, alert: AlertRecord, plan: dict[str, Any]) -> LoopRecord:
    """The loop row and its alert's events (and reason), in one transaction."""
    status, detail = plan["status"], plan["detail"]
    kind = "loop.waiting_approval" if status == "waiting_approval" else "loop.started"
    notes = [AlertNote(kind, detail)]
    if status == "succeeded":
        notes.append(AlertNote("loop.succeeded", detail))
    loop, _ = store.loops.create_or_get(
        alert.id,
        alert.action,
        alert.model_name,
        alert.environment,
        plan["incumbent"],
        status,
        plan["step"],
        event={"step": "start", "status": status, "detail": detail},
        open_key=plan.get("key"),
        notes=notes,
        alert_reason=plan["reason"],
        reason=plan["reason"],
        state=plan["state"],
        finished_at=_now() if status == "succeeded" else None,
    )
    return loop


def start(store: MetadataStore, alert: AlertRecord, config: Config) -> LoopRecord:
    """The loop of ``alert``: created now (as its action says) or the one it already has.

    ``notify`` records that the owner is told and ends (the service's channels tell them);
    ``retrain`` and ``approve`` start at the dataset step, unless the model was imported
    (Loopline cannot retrain it: the loop waits for a person instead) or another retrain of
    the same model and environment is open or started within ``retrain.cooldown_s``
    (then the owner is told only; also when another monitor opened one a moment ago).
    """
    if alert.action not in LOOP_ACTIONS:
        raise ConfigError(
            f"alert {alert.id} has action {alert.action!r}: only {', '.join(LOOP_ACTIONS)} "
            "start a loop"
        )
    existing = store.loops.get_by_alert(alert.id)
    if existing is not None:
        return existing
    plan = _plan(store, alert, config)
    try:
        return _create(store, alert, plan)
    except LoopBusy as err:  # another monitor opened a retrain of the model meanwhile
        return _create(store, alert, {**_skipped(alert, err.loop, config),
                                      "incumbent": plan["incumbent"]})  # fmt: skip


class _Heartbeat:
    """Beats for the holder every ``interval_s`` while a step runs (a build takes minutes)."""

    def __init__(self, store: MetadataStore, loop_id: int, owner: str, interval_s: float) -> None:
        self._args = (store, loop_id, owner)
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"loop-{loop_id}", daemon=True)

    def _run(self) -> None:
        store, loop_id, owner = self._args
        while not self._stop.wait(self._interval):
            try:
                if not store.loops.heartbeat(loop_id, owner):
                    return  # lost it: the next write says so
            except Exception:  # a store hiccup: try again next beat
                continue

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join(timeout=10)


def advance(
    config: Config,
    store: MetadataStore,
    artifacts: ArtifactStore,
    loop_id: int,
    *,
    owner: str,
    reporter: Reporter | None = None,
    stale_after_s: float | None = None,
    config_path: Path | None = None,
) -> LoopRecord:
    """Claim the loop for ``owner`` and run its steps until it waits or ends; the loop.

    Returns the loop unchanged when another process holds it (and is alive: its heartbeat
    is younger than ``stale_after_s``, default ``monitor.loop_stale_s``), or when it ended
    meanwhile (a person rejected it). A step that fails with a LooplineError fails the loop
    with that reason; another error is raised, and fails the loop at its ``MAX_FAILURES``-th
    time in a row (a store that cannot be reached leaves it as it is, to be resumed).
    ``config_path`` is the config file a temporary replica server reads (default
    ``<root>/loopline.yaml``).
    """
    stale = config.monitor.loop_stale_s if stale_after_s is None else stale_after_s
    loop = store.loops.claim(loop_id, owner, stale)
    if loop is None:
        return store.loops.get(loop_id)
    ctx = LoopContext(config, store, artifacts, owner, reporter, config_path)
    try:
        with _Heartbeat(store, loop_id, owner, max(0.2, stale / 4)).running():
            _run(ctx, loop, steps())
    except LoopNotHeld:
        pass  # another process took it over, or a person ended it: theirs now
    finally:
        with contextlib.suppress(Exception):
            store.loops.release(loop_id, owner)
    return store.loops.get(loop_id)


def _run(ctx: LoopContext, loop: LoopRecord, table: dict[str, StepFn]) -> LoopRecord:
    """Run the held loop's steps until one waits or the loop ends."""
    if loop.status == "waiting_approval":  # (a running step is tried once more first)
        loop = _overdue(ctx, loop) or loop
    while loop.status == "running":
        ended = _end_if_resolved(ctx.store, loop)
        if ended is not None:
            return ended
        try:
            following = table[loop.step](ctx, loop)
        except (StoreError, LoopNotHeld):
            raise
        except LooplineError as err:
            following = ctx.finish(loop, "failed", f"{loop.step}: {err}")
        except Exception as err:
            following = _failed_again(ctx, loop, err)
            if following is None:
                raise
        current = _ran(ctx, following or ctx.store.loops.get(loop.id))
        if following is None:  # it waits: the next advance looks again
            return _overdue(ctx, current) or current
        loop = current
    return loop


def _failed_again(ctx: LoopContext, loop: LoopRecord, err: Exception) -> LoopRecord | None:
    """Count a step's crash in the loop's state; the failed loop at the last allowed one."""
    current = ctx.store.loops.get(loop.id)
    n = int(current.state.get("failures", 0)) + 1
    why = f"{current.step}: {type(err).__name__}: {err}"
    if n >= MAX_FAILURES:
        return ctx.finish(current, "failed", f"{why} ({n} failures in a row)")
    state = {**current.state, "failures": n, "last_error": why}
    ctx.store.loops.advance(loop.id, ctx.owner, state=state)
    return None


def _ran(ctx: LoopContext, loop: LoopRecord) -> LoopRecord:
    """The loop after a step ran without crashing: its count of crashes starts again."""
    if loop.is_open and "failures" in loop.state:
        state = {k: v for k, v in loop.state.items() if k not in ("failures", "last_error")}
        return ctx.store.loops.advance(loop.id, ctx.owner, state=state)
    return loop


def _step_since(loop: LoopRecord) -> datetime:
    """When the loop came to its step: its newest timeline entry of another step."""
    for event in reversed(loop.timeline):
        if event.get("step") != loop.step and event.get("at"):
            return parse(str(event["at"]))
    return utc(loop.started_at) if loop.started_at is not None else _now()


def _overdue(ctx: LoopContext, loop: LoopRecord) -> LoopRecord | None:
    """End a loop that waited at its step longer than the step allows (None otherwise)."""
    spec = DEADLINES.get(loop.step)
    if spec is None or not loop.is_open:
        return None
    field, status, says = spec
    limit = float(getattr(ctx.policy, field))
    if (_now() - _step_since(loop)).total_seconds() <= limit:
        return None
    why = (
        f"gave up at step {loop.step} after {limit:g} s (retrain.{field}): "
        f"{says or loop.reason or 'it waited'}"
    )
    if loop.status == "waiting_approval":  # take it from a person's decision first
        taken = ctx.store.loops.transition(loop.id, "waiting_approval", status="running")
        if taken is None:
            return ctx.store.loops.get(loop.id)  # decided meanwhile
        loop = taken
    return ctx.finish(loop, status, why)


def decide(
    store: MetadataStore, alert_id: int, approve: bool, *, actor: str, reason: str | None = None
) -> LoopRecord:
    """A person's decision on the loop of ``alert_id``.

    Approving continues a loop waiting for approval (the next ``advance`` tests the
    candidate in the replica; for an imported model it closes the loop). Rejecting ends any
    open loop that has not begun its release (at whatever step it is, also one stuck
    waiting), with production untouched; a release under way is undone with
    ``loopline rollback``.
    """
    loop = store.loops.get_by_alert(alert_id)
    if loop is None:
        raise NotFound(f"alert {alert_id} has no loop (see `loopline alerts show {alert_id}`)")
    now = _now()
    if approve:
        if loop.status != "waiting_approval":
            raise Conflict(
                f"the loop of alert {alert_id} is {loop.status} at step {loop.step}, not "
                "waiting for approval; nothing to approve"
            )
        imported = bool(loop.state.get("imported"))
        detail = f"approved by {actor}" + (f": {reason}" if reason else "")
        fields: dict[str, Any] = {
            "status": "succeeded" if imported else "running",
            "step": "done" if imported else "replica",
            "decided_by": actor,
            "reason": None,
            "state": {**loop.state, "approved_by": actor, "approved_at": now.isoformat()},
        }
        if imported:
            fields["finished_at"] = now
        done = store.loops.transition(
            loop.id,
            "waiting_approval",
            event={"step": "approval", "status": "approved", "detail": detail, "actor": actor},
            notes=[AlertNote("loop.approved", detail, actor)],
            **fields,
        )
    else:
        if not loop.is_open:
            raise Conflict(f"the loop of alert {alert_id} has ended ({loop.status}); nothing "
                           "to reject")  # fmt: skip
        if loop.step not in REJECTABLE:
            raise Conflict(
                f"the loop of alert {alert_id} is releasing {loop.model_name}:"
                f"{loop.model_version} (step {loop.step}): too late to reject; `loopline "
                f"rollback {loop.model_name} --env {loop.environment}` undoes the release"
            )
        why = reason or f"rejected by {actor}"
        detail = f"rejected by {actor}: {why}"
        done = store.loops.transition(
            loop.id,
            OPEN_STATUSES,
            steps=REJECTABLE,
            event={"step": loop.step, "status": "rejected", "detail": detail, "actor": actor},
            notes=[AlertNote("loop.rejected", detail, actor)],
            alert_reason=f"the retrain was rejected by {actor}: {why}",
            status="rejected",
            decided_by=actor,
            reason=why,
            finished_at=now,
        )
    if done is None:
        raise Conflict(f"the loop of alert {alert_id} was decided or changed meanwhile")
    if done.status == "rejected":
        from loopline.monitor.retrain_data import release_captures

        release_captures(store, done)  # what it kept for retraining, retention may take
    return done


def open_loops(store: MetadataStore) -> list[LoopRecord]:
    """Loops still running or waiting for approval, oldest first."""
    return store.loops.list(OPEN_STATUSES)


def steps() -> dict[str, StepFn]:
    """Each step of a running loop by name."""
    return {**candidate_steps(), "replica": replica, "release": release, "canary": canary}
