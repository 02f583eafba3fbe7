"""The loop an alert starts (retrain, approve, notify), as a resumable state machine.

``start`` records one loop per alert (``store.loops``: the unique alert id makes a second
start return the first loop). ``advance`` claims the loop for its caller and runs its steps
until one must wait (for labels, a person, a canary's verdict) or the loop ends; every step
leaves its result in the loop row before the next begins, so a process killed at any point
is followed by one that resumes where it stopped. ``decide`` records a person's approval or
rejection. The steps themselves are in ``loopline.monitor.retrain``::

    dataset -> build -> gate -> [approval] -> replica -> release -> canary -> done

Statuses: ``running``, ``waiting_approval``, and the final ``succeeded``, ``rejected`` (the
candidate was not good enough, or a person said no: production keeps the incumbent) and
``failed`` (something broke, or the canary was rolled back). Nothing here imports torch:
the build step runs the project's Build pipeline, which needs the train extra.

The steps that make the candidate are in ``loopline.monitor.retrain``; those that release
it (replica, release, canary) are here. Each is safe to run again after a crash: a replica
test already recorded for the candidate is reused, and a release already in the deployment
is not made twice.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopline.drivers.data.captures import parse_time
from loopline.drivers.metadata.loops import OPEN_STATUSES, LoopNotHeld, LoopRecord
from loopline.errors import ConfigError, Conflict, LooplineError, NotFound, StoreError
from loopline.monitor.retrain import (
    ACTOR,
    LoopContext,
    StepFn,
    build_config,
    candidate_steps,
    parse,
)

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.alerts import AlertRecord
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.pipeline.step import Reporter

__all__ = ["ACTOR", "STALE_AFTER_S", "advance", "decide", "open_loops", "start"]

STALE_AFTER_S = 60.0  # a holder silent this long has died: another process may take over
LOOP_ACTIONS = ("retrain", "approve", "notify")


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _incumbent(store: MetadataStore, alert: AlertRecord) -> int | None:
    """The version the alert is about; else the one its environment serves."""
    if alert.model_version is not None:
        return alert.model_version
    dep = store.deployments.get(alert.environment)
    if dep is not None and dep.model_name == alert.model_name:
        return dep.stable_version
    return None


def _busy(store: MetadataStore, alert: AlertRecord, cooldown_s: float) -> LoopRecord | None:
    """Another retrain of this model and environment: open, or started within the cooldown."""
    since = _now() - timedelta(seconds=cooldown_s)
    for other in store.loops.list(model_name=alert.model_name, environment=alert.environment):
        if other.alert_id == alert.id or other.action not in ("retrain", "approve"):
            continue
        if other.state.get("imported") or other.state.get("skipped"):
            continue
        if other.is_open or (other.started_at is not None and other.started_at >= since):
            return other
    return None


def start(store: MetadataStore, alert: AlertRecord, config: Config) -> LoopRecord:
    """The loop of ``alert``: created now (as its action says) or the one it already has.

    ``notify`` records that the owner is told and ends (the service's channels tell them);
    ``retrain`` and ``approve`` start at the dataset step, unless the model was imported
    (Loopline cannot retrain it: the loop waits for a person instead) or another retrain of
    the same model and environment is open or started within ``retrain.cooldown_s``
    (then the owner is told only).
    """
    if alert.action not in LOOP_ACTIONS:
        raise ConfigError(
            f"alert {alert.id} has action {alert.action!r}: only {', '.join(LOOP_ACTIONS)} "
            "start a loop"
        )
    existing = store.loops.get_by_alert(alert.id)
    if existing is not None:
        return existing
    incumbent = _incumbent(store, alert)
    ref = f"{alert.model_name}:{incumbent}" if incumbent is not None else alert.model_name
    who = config.monitor.owner or "the owner"
    imported = False
    if incumbent is not None:
        with contextlib.suppress(NotFound):
            mv = store.models.get(alert.model_name, incumbent)
            imported = bool((mv.lineage or {}).get("imported"))
    status, step, reason = "running", "dataset", None
    state: dict[str, Any] = {}
    busy = (
        _busy(store, alert, config.monitor.retrain.cooldown_s) if alert.action != "notify" else None
    )
    if alert.action == "notify":
        status, step = "succeeded", "done"
        detail = f"{who} told of alert {alert.id} ({alert.condition}); no retrain (action notify)"
    elif imported:
        status, step, state = "waiting_approval", "approval", {"imported": True}
        reason = detail = (
            f"{ref} was imported (trained elsewhere): Loopline cannot retrain it; retrain it "
            f"where it was trained and import the new version, then `loopline approve "
            f"{alert.id}` to close this loop (or `loopline reject {alert.id} --reason ...`)"
        )
    elif busy is not None:
        status, step, state = "succeeded", "done", {"skipped": True, "other_loop": busy.id}
        reason = detail = (
            f"no retrain: loop {busy.id} (alert {busy.alert_id}) already retrains "
            f"{alert.model_name} for {alert.environment} ({busy.status}, started "
            f"{busy.started_at.isoformat() if busy.started_at else '?'}; retrain.cooldown_s "
            f"{config.monitor.retrain.cooldown_s:g}); {who} told"
        )
    else:
        detail = f"retrain {ref} for {alert.environment} (alert {alert.id}: {alert.condition})"
    loop, created = store.loops.create_or_get(
        alert.id,
        alert.action,
        alert.model_name,
        alert.environment,
        incumbent,
        status,
        step,
        event={"step": "start", "status": status, "detail": detail},
        reason=reason,
        state=state,
        finished_at=_now() if status == "succeeded" else None,
    )
    if created:
        kind = "loop.waiting_approval" if status == "waiting_approval" else "loop.started"
        store.alerts.add_event(alert.id, kind, detail, ACTOR, {"loop_id": loop.id})
        if status == "succeeded":
            store.alerts.add_event(alert.id, "loop.succeeded", detail, ACTOR, {"loop_id": loop.id})
        if reason:
            store.alerts.set_reason(alert.id, reason)
    return loop


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
    stale_after_s: float = STALE_AFTER_S,
    config_path: Path | None = None,
) -> LoopRecord:
    """Claim the loop for ``owner`` and run its steps until it waits or ends; the loop.

    Returns the loop unchanged when another process holds it (and is alive). A step that
    fails with a LooplineError fails the loop with that reason (a store that cannot be
    reached leaves it as it is, to be resumed). ``config_path`` is the config file a
    temporary replica server reads (default ``<root>/loopline.yaml``).
    """
    loop = store.loops.claim(loop_id, owner, stale_after_s)
    if loop is None:
        return store.loops.get(loop_id)
    ctx = LoopContext(config, store, artifacts, owner, reporter, config_path)
    table = steps()
    try:
        with _Heartbeat(store, loop_id, owner, max(0.2, stale_after_s / 4)).running():
            while loop.status == "running":
                try:
                    following = table[loop.step](ctx, loop)
                except (StoreError, LoopNotHeld):
                    raise
                except LooplineError as err:
                    following = ctx.finish(loop, "failed", f"{loop.step}: {err}")
                if following is None:  # it waits: the next advance looks again
                    break
                loop = following
    finally:
        with contextlib.suppress(Exception):
            store.loops.release(loop_id, owner)
    return store.loops.get(loop_id)


def decide(
    store: MetadataStore, alert_id: int, approve: bool, *, actor: str, reason: str | None = None
) -> LoopRecord:
    """A person's decision on the loop of ``alert_id``, which must be waiting for approval.

    Approving continues the loop (the next ``advance`` tests the candidate in the replica;
    for an imported model it closes the loop); rejecting ends it with production untouched.
    """
    loop = store.loops.get_by_alert(alert_id)
    if loop is None:
        raise NotFound(f"alert {alert_id} has no loop (see `loopline alerts show {alert_id}`)")
    if loop.status != "waiting_approval":
        raise Conflict(
            f"the loop of alert {alert_id} is {loop.status} at step {loop.step}, not waiting "
            "for approval; nothing to decide"
        )
    now = _now()
    if approve:
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
        kind = "loop.approved"
    else:
        why = reason or f"rejected by {actor}"
        detail = f"rejected by {actor}: {why}"
        fields = {
            "status": "rejected",
            "decided_by": actor,
            "reason": why,
            "finished_at": now,
            "state": {**loop.state, "rejected_by": actor},
        }
        kind = "loop.rejected"
    event = {
        "step": "approval",
        "status": "approved" if approve else "rejected",
        "detail": detail,
        "actor": actor,
    }
    done = store.loops.transition(loop.id, "waiting_approval", event=event, **fields)
    if done is None:
        raise Conflict(f"the loop of alert {alert_id} was decided or changed meanwhile")
    store.alerts.add_event(alert_id, kind, detail, actor, {"loop_id": loop.id})
    if not approve:
        store.alerts.set_reason(alert_id, f"the retrain was rejected by {actor}: {why}")
    return done


def open_loops(store: MetadataStore) -> list[LoopRecord]:
    """Loops still running or waiting for approval, oldest first."""
    return store.loops.list(OPEN_STATUSES)


# -- replica -------------------------------------------------------------------------------
def replica(ctx: LoopContext, loop: LoopRecord) -> LoopRecord | None:
    """The replica test in ``retrain.replica_environment`` (one recorded already is reused)."""
    from loopline.deploy.preprod import deploy

    env, name, version = ctx.policy.replica_environment, loop.model_name, loop.model_version
    assert version is not None
    began = loop.state.get("replica_started_at")
    test = ctx.store.replica_tests.latest(name, version, [env])
    reuse = test is not None and (
        test.passed or (began is not None and _utc(test.started_at) >= _utc(parse(began)))
    )
    if test is None or not reuse:
        loop = ctx.save(
            loop,
            event={
                "step": "replica",
                "status": "running",
                "detail": f"replica test of {name}:{version} in {env}",
            },
            state={**loop.state, "replica_started_at": _now().isoformat()},
        )
        result = deploy(
            build_config(ctx, loop),
            ctx.store,
            f"{name}:{version}",
            env=env,
            actor=ACTOR,
            config_path=ctx.config_path,
            artifacts=ctx.artifacts,
            reporter=ctx.reporter,
            reason=f"alert {loop.alert_id}",
            replay_since=parse_time(loop.state.get("until"), "until"),  # not its training data
        )
        test = result.record
    if not test.passed:
        why = "; ".join(test.reasons) or "see its report"
        return ctx.finish(
            loop,
            "rejected",
            f"{name}:{version} failed its replica test in {env} ({test.id[:12]}): {why}",
            replica_test_id=test.id,
        )
    detail = f"replica test {test.id[:12]} in {env} passed"
    return ctx.save(
        loop,
        event={"step": "replica", "status": "succeeded", "detail": detail},
        step="release",
        replica_test_id=test.id,
    )


# -- release and canary ----------------------------------------------------------------------
def release(ctx: LoopContext, loop: LoopRecord) -> LoopRecord | None:
    """Promote the candidate (canary or direct); a release already made is not made again."""
    from loopline.deploy import release as rel

    env, name, version = loop.environment, loop.model_name, loop.model_version
    dep = ctx.store.deployments.get(env)
    if (
        dep is not None
        and dep.model_name == name
        and version in (dep.stable_version, dep.candidate_version)
    ):
        state, how = dep, "already released"  # resumed after the promote was written
    else:
        strategy = ctx.policy.strategy
        if dep is None or dep.stable_version is None or dep.model_name != name:
            strategy = "direct"  # nothing stable to run a canary against
        state = rel.promote(
            ctx.store,
            f"{name}:{version}",
            to=env,
            strategy=strategy,
            env=ctx.config.environment(env),
            actor=ACTOR,
            reason=f"alert {loop.alert_id}",
            replica_envs=rel.replica_environments(ctx.config, env),
        )
        how = strategy if state.candidate_version == version else "direct"
    detail = f"{name}:{version} released to {env} ({how}, generation {state.generation})"
    extra = {**loop.state, "released_at": _now().isoformat(), "strategy": how}
    return ctx.save(
        loop,
        event={"step": "release", "status": "succeeded", "detail": detail},
        step="canary",
        deployment_generation=state.generation,
        state=extra,
    )


def canary(ctx: LoopContext, loop: LoopRecord) -> LoopRecord | None:
    """Wait for the verdict the servers apply: promoted, rolled back, or too slow."""
    from loopline.deploy import release as rel
    from loopline.drivers.metadata.deployments import DeploymentConflict

    env, name, version = loop.environment, loop.model_name, loop.model_version
    ref = f"{name}:{version}"
    dep = ctx.store.deployments.get(env)
    if dep is not None and dep.model_name == name and dep.stable_version == version:
        return ctx.finish(
            loop, "succeeded", f"{ref} serves all of {env}'s traffic (generation {dep.generation})"
        )
    if dep is not None and dep.model_name == name and dep.candidate_version == version:
        released = parse_time(loop.state.get("released_at"), "released_at") or _now()
        timeout = ctx.policy.release_timeout_s
        if (_now() - released).total_seconds() <= timeout:
            return ctx.wait(
                loop,
                f"canary of {ref} at {dep.candidate_share:.0%} of {env}: waiting for its verdict",
            )
        why = f"the canary of {ref} was not promoted within {timeout:g} s (release_timeout_s)"
        try:
            rel.rollback(
                ctx.store,
                name,
                env=env,
                actor=ACTOR,
                reason=f"alert {loop.alert_id}: {why}",
                expected_generation=dep.generation,
            )
        except DeploymentConflict:
            return None  # the servers acted meanwhile: look again next time
        return ctx.finish(loop, "failed", f"{why}; rolled back")
    return ctx.finish(loop, "failed", f"canary rolled back: {_why_gone(ctx, loop, ref)}")


def _why_gone(ctx: LoopContext, loop: LoopRecord, ref: str) -> str:
    """What the deployment's history says took the candidate away."""
    after = loop.deployment_generation or 0
    changes = [
        e
        for e in ctx.store.deployments.history(loop.environment, limit=200)
        if e["generation"] > after
    ]
    for event in reversed(changes):  # oldest first: the change that removed it
        if loop.model_version in (event["candidate_version"], event["stable_version"]):
            continue
        reason = (event.get("reason") or "").removeprefix(f"{ref}: ")
        if "rollback" in event["action"]:
            return reason or f"{event['action']} by {event['actor']}"
        return f"{event['action']} by {event['actor']}: {reason or 'no reason given'}"
    return "the candidate is no longer deployed"


def steps() -> dict[str, StepFn]:
    """Each step of a running loop by name."""
    return {**candidate_steps(), "replica": replica, "release": release, "canary": canary}
