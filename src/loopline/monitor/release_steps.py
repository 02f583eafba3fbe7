"""The steps of a retrain loop that release its candidate: the replica test, the release
(canary or direct) and the canary's verdict (``loopline.monitor.loop`` runs them).

Each is safe to run again after a crash: a replica test already recorded for the candidate
is reused, a release already in the deployment is not made twice (and its canary's time
counts from the release, not from the resume). A replica environment busy with another
test (a person's ``loopline deploy``) is waited for; an environment a person changed since
the gate compared the candidate is not released to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loopline.clock import now as _now
from loopline.clock import parse, utc
from loopline.drivers.metadata.loops import LoopRecord
from loopline.errors import Conflict
from loopline.monitor.retrain import ACTOR, LoopContext, build_config, replay_since

if TYPE_CHECKING:
    from loopline.drivers.metadata.deployments import DeploymentState

__all__ = ["STAGING_WAIT", "canary", "release", "replica"]

STAGING_WAIT = "waiting for staging: "


# -- replica -------------------------------------------------------------------------------
def _staging_busy(err: Conflict) -> bool:
    """Whether ``err`` is ``deploy``'s refusal while another replica test holds staging."""
    return "a replica test is already running" in str(err)


def replica(ctx: LoopContext, loop: LoopRecord) -> LoopRecord | None:
    """The replica test in ``retrain.replica_environment`` (one recorded already is reused);
    while another test holds the environment (a person's), the loop waits for it."""
    from loopline.deploy.preprod import deploy

    env, name, version = ctx.policy.replica_environment, loop.model_name, loop.model_version
    assert version is not None
    began = loop.state.get("replica_started_at")
    test = ctx.store.replica_tests.latest(name, version, [env])
    reuse = test is not None and (
        test.passed or (began is not None and utc(test.started_at) >= parse(began))
    )
    if test is None or not reuse:
        if began is None or not (loop.reason or "").startswith(STAGING_WAIT):
            loop = ctx.save(
                loop,
                event={
                    "step": "replica",
                    "status": "running",
                    "detail": f"replica test of {name}:{version} in {env}",
                },
                state={**loop.state, "replica_started_at": _now().isoformat()},
            )
        try:
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
                replay_since=replay_since(loop),  # not what it was trained on
            )
        except Conflict as err:
            if not _staging_busy(err):
                raise
            return ctx.wait(loop, f"{STAGING_WAIT}{err}")
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
        reason=None,
        replica_test_id=test.id,
    )


# -- release and canary ----------------------------------------------------------------------
def _changed(dep: DeploymentState | None, loop: LoopRecord) -> str | None:
    """What serves the loop's environment now, when it is not what the gate compared the
    candidate with (``state["gated_against"]``, else the incumbent); None when it is."""
    if dep is None or dep.stable_version is None:
        return None  # nothing serves: nothing changed that the gate could have seen
    gated = loop.state.get("gated_against", loop.incumbent_version)
    if dep.model_name == loop.model_name and dep.stable_version == gated:
        return None
    serving = (
        f"v{dep.stable_version}"
        if dep.model_name == loop.model_name
        else f"{dep.model_name}:{dep.stable_version}"
    )
    return (
        f"{loop.environment} changed meanwhile ({serving} now serves {loop.environment}, the "
        f"gate compared {loop.model_name}:{loop.model_version} with v{gated}): not released"
    )


def release(ctx: LoopContext, loop: LoopRecord) -> LoopRecord | None:
    """Promote the candidate (canary or direct); a release already made is not made again,
    nor one whose environment a person changed since the gate compared the candidate."""
    from loopline.deploy import release as rel

    env, name, version = loop.environment, loop.model_name, loop.model_version
    dep = ctx.store.deployments.get(env)
    released_at = loop.state.get("released_at")
    if (
        dep is not None
        and dep.model_name == name
        and version in (dep.stable_version, dep.candidate_version)
    ):
        state, how = dep, "already released"  # resumed after the promote was written
        if released_at is None and dep.candidate_version == version and dep.candidate_since:
            released_at = utc(dep.candidate_since).isoformat()  # the canary's own start
    else:
        changed = _changed(dep, loop)
        if changed is not None:
            return ctx.finish(loop, "rejected", changed)
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
    extra = {**loop.state, "released_at": released_at or _now().isoformat(), "strategy": how}
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
        since = loop.state.get("released_at")
        released = parse(since) if since else _now()
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
    return ctx.finish(loop, "failed", _gone(ctx, loop, ref))


def _gone(ctx: LoopContext, loop: LoopRecord, ref: str) -> str:
    """What the deployment's history says took the candidate away, worded by its action."""
    after = loop.deployment_generation or 0
    changes = [
        e
        for e in ctx.store.deployments.history(loop.environment, limit=200)
        if e["generation"] > after
    ]
    for event in reversed(changes):  # oldest first: the change that removed it
        if loop.model_version in (event["candidate_version"], event["stable_version"]):
            continue
        action, actor = event["action"], event["actor"]
        reason = (event.get("reason") or "").removeprefix(f"{ref}: ")
        if "rollback" in action:
            return f"canary rolled back: {reason or f'{action} by {actor}'}"
        what = f"{event.get('model_name') or loop.model_name}:{event['stable_version']}"
        return f"canary ended: {action} of {what} by {actor}: {reason or 'no reason given'}"
    return "canary ended: the candidate is no longer deployed"
