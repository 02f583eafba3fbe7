"""Releasing models: the library API behind ``loopline promote``, ``rollback`` and the loop.

Each function changes an environment's desired state in the metadata store (one
compare-and-set transition, with history, audit and the alias of the environment's name
moved to the stable version) and returns the new state. The servers of the environment
pick the change up within their reconcile interval; nothing here talks to a server.

A function reads the deployment, decides and writes in one transaction holding the
environment's lock, so concurrent callers queue and each decides on the state the one
before it left; pass ``expected_generation`` to act only on the exact state you read
(``DeploymentConflict`` otherwise), as the canary judge does.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from loopline.drivers.metadata.deployments import DeploymentConflict, DeploymentState
from loopline.drivers.metadata.registry import parse_model_ref
from loopline.environments import STRATEGIES
from loopline.errors import ConfigError, Conflict, NotFound

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.environments import EnvironmentConfig


class PromotionRefused(Conflict):
    """The version may not be promoted (its replica test failed or never ran)."""


def default_actor() -> str:
    """Who acts: ``$LOOPLINE_ACTOR``, else the OS user."""
    explicit = os.environ.get("LOOPLINE_ACTOR")
    if explicit:
        return explicit
    try:
        return getpass.getuser()
    except Exception:  # no user name (a container's uid without a passwd entry)
        return f"uid:{os.getuid()}"


def _now() -> datetime:
    return datetime.now(UTC)


def _retry(
    store: MetadataStore,
    environment: str,
    decide: Callable[[DeploymentState], tuple[str, dict[str, Any]] | None],
    *,
    actor: str,
    reason: str | None,
    expected_generation: int | None = None,
) -> DeploymentState:
    """``decide`` the change from the current state and write it, in one locked
    transaction; with ``expected_generation``, only if the state is still that one."""

    def guarded(current: DeploymentState) -> tuple[str, dict[str, Any]] | None:
        if expected_generation is not None and current.generation != expected_generation:
            raise DeploymentConflict(
                f"deployment {environment} is at generation {current.generation}, not "
                f"{expected_generation}; read it again and retry"
            )
        return decide(current)

    return store.deployments.update(environment, guarded, actor=actor, reason=reason)


def replica_environments(config: Config, to: str) -> list[str] | None:
    """The environments whose replica tests qualify a version for ``to``: those that
    replicate it (``replica_of``); None (any) when none does."""
    names = [n for n, e in config.environments.items() if e.replica_of == to]
    return names or None


def check_replica_test(
    store: MetadataStore, name: str, version: int, environments: list[str] | None = None
) -> None:
    """PromotionRefused unless the latest replica test of ``name:version`` (in one of
    ``environments``, when given) passed."""
    test = store.replica_tests.latest(name, version, environments)
    if test is None:
        where = f" in {' or '.join(environments)}" if environments else ""
        env = environments[0] if environments else "staging"
        raise PromotionRefused(
            f"{name}:{version} has no replica test{where}; run `loopline deploy "
            f"{name}:{version} --env {env}` first"
        )
    if not test.passed:
        why = "; ".join(test.reasons) or "see the report"
        raise PromotionRefused(
            f"{name}:{version} failed its latest replica test ({test.id[:12]}): {why}"
        )


def promote(
    store: MetadataStore,
    ref: str,
    *,
    to: str = "production",
    strategy: str = "direct",
    share: float | None = None,
    env: EnvironmentConfig | None = None,
    actor: str | None = None,
    reason: str | None = None,
    require_replica_test: bool = True,
    replica_envs: list[str] | None = None,
    expected_generation: int | None = None,
) -> DeploymentState:
    """Release ``NAME:VERSION`` (or ``NAME@ALIAS``) to environment ``to``.

    ``direct`` serves it at once (the previous stable version is kept for rollback);
    ``canary`` sends it ``share`` of the requests (default: the environment's canary
    policy) next to the stable version; ``shadow`` mirrors requests to it while answers
    come from the stable version only. Refused unless its latest replica test passed
    (in one of ``replica_envs`` when given: see ``replica_environments``).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    actor = actor or default_actor()
    mv = store.models.resolve(ref)
    name, version = mv.name, mv.version
    if mv.archived_at is not None:
        raise Conflict(f"{name}:{version} is archived; unarchive it before promoting it")
    if require_replica_test:
        check_replica_test(store, name, version, replica_envs)
    if strategy == "canary":
        share = share if share is not None else (env.canary.share if env else 0.1)
        if not 0.0 < share < 1.0:
            raise ConfigError(f"canary share {share}: must be between 0 and 1 (exclusive)")
    elif strategy == "shadow":
        share = share if share is not None else (env.shadow.share if env else 1.0)
        if not 0.0 < share <= 1.0:
            raise ConfigError(f"shadow share {share}: must be in (0, 1]")
    target = env.target if env is not None else "local"
    endpoint = env.endpoint if env is not None else None

    def decide(cur: DeploymentState) -> tuple[str, dict[str, Any]] | None:
        common = {"target": target, "endpoint": endpoint or cur.endpoint}
        if strategy == "direct" or cur.stable_version is None or cur.model_name != name:
            if strategy != "direct" and cur.model_name not in (None, name):
                raise Conflict(
                    f"{to} serves {cur.model_name}, not {name}: a {strategy} needs the same "
                    "model; promote with --strategy direct to switch models"
                )
            if strategy != "direct" and cur.stable_version is None:
                raise Conflict(
                    f"{to} has no stable version yet to run a {strategy} against; promote "
                    f"{name}:{version} with --strategy direct first"
                )
            if cur.stable_version == version and cur.candidate_version is None:
                return None  # already there: nothing to do
            same_model = cur.model_name == name
            return "promote", {
                **common,
                "model_name": name,
                "stable_version": version,
                "previous_version": (
                    cur.stable_version
                    if same_model and cur.stable_version != version
                    else cur.previous_version
                    if same_model
                    else None
                ),
                "candidate_version": None,
                "strategy": "direct",
                "candidate_share": 0.0,
                "candidate_since": None,
                "status": "pending",
            }
        if cur.stable_version == version:
            raise Conflict(f"{name}:{version} is already the stable version of {to}")
        if (
            cur.candidate_version == version
            and cur.strategy == strategy
            and cur.candidate_share == share
        ):
            return None
        return strategy, {
            **common,
            "candidate_version": version,
            "strategy": strategy,
            "candidate_share": share,
            "candidate_since": _now(),
            "status": "pending",
        }

    return _retry(
        store, to, decide, actor=actor, reason=reason, expected_generation=expected_generation
    )


def rollback(
    store: MetadataStore,
    name: str,
    *,
    env: str = "production",
    actor: str | None = None,
    reason: str | None = None,
    expected_generation: int | None = None,
) -> DeploymentState:
    """Undo the last release of ``name`` in ``env``.

    With a canary or shadow running, the candidate is removed (the stable version keeps
    serving); otherwise the previous stable version serves again. The environment is never
    left without a serving version.
    """
    actor = actor or default_actor()
    name = parse_model_ref(name)[0]

    def decide(cur: DeploymentState) -> tuple[str, dict[str, Any]] | None:
        if cur.model_name != name or cur.stable_version is None:
            serving = f"serves {cur.model_name}" if cur.model_name else "serves nothing"
            raise NotFound(f"{env} {serving}; nothing of {name} to roll back")
        if cur.candidate_version is not None:
            return "rollback", {
                "candidate_version": None,
                "strategy": "direct",
                "candidate_share": 0.0,
                "candidate_since": None,
                "status": "pending",
            }
        if cur.previous_version is None:
            raise Conflict(
                f"{env} has no previous version of {name} to roll back to "
                f"(it serves {name}:{cur.stable_version})"
            )
        return "rollback", {
            "stable_version": cur.previous_version,
            "previous_version": cur.stable_version,
            "status": "pending",
        }

    return _retry(
        store, env, decide, actor=actor, reason=reason, expected_generation=expected_generation
    )


def set_canary_share(
    store: MetadataStore,
    env: str,
    share: float,
    *,
    actor: str | None = None,
    reason: str | None = None,
) -> DeploymentState:
    """Change the share of a running canary (0 < share < 1)."""
    if not 0.0 < share < 1.0:
        raise ConfigError(f"canary share {share}: must be between 0 and 1 (exclusive)")

    def decide(cur: DeploymentState) -> tuple[str, dict[str, Any]] | None:
        if cur.candidate_version is None or cur.strategy != "canary":
            raise Conflict(f"{env} runs no canary")
        if cur.candidate_share == share:
            return None
        return "share", {"candidate_share": share}

    return _retry(store, env, decide, actor=actor or default_actor(), reason=reason)


def stage(
    store: MetadataStore,
    ref: str,
    *,
    env: str = "staging",
    env_config: EnvironmentConfig | None = None,
    actor: str | None = None,
    reason: str | None = None,
) -> DeploymentState:
    """Serve ``ref`` alone in a pre-production environment (no replica test needed)."""
    return promote(
        store,
        ref,
        to=env,
        strategy="direct",
        env=env_config,
        actor=actor,
        reason=reason or "replica test",
        require_replica_test=False,
    )


# -- status ------------------------------------------------------------------------------
@dataclass
class EnvironmentStatus:
    """What should run in an environment and what does."""

    environment: str
    target: str
    endpoint: str
    deployment: DeploymentState | None
    replicas: list[dict[str, Any]]

    @property
    def health(self) -> str:
        dep = self.deployment
        if dep is None or dep.stable_version is None:
            return "empty"
        if not self.replicas:
            return "not running"
        want = set(dep.versions)
        current = [
            r for r in self.replicas if r["generation"] == dep.generation and r["status"] == "ok"
        ]
        if current and all(set(r["versions"]) >= want for r in current):
            return "healthy" if len(current) == len(self.replicas) else "degraded"
        return "pending" if any(r["status"] == "ok" for r in self.replicas) else "failed"

    @property
    def traffic(self) -> dict[str, float]:
        dep = self.deployment
        if dep is None or dep.stable_version is None:
            return {}
        stable = dep.ref(dep.stable_version) or ""
        out = {stable: 1.0}
        if dep.candidate_version is not None:
            cand = dep.ref(dep.candidate_version) or ""
            if dep.strategy == "canary":
                out[stable] = round(1.0 - dep.candidate_share, 6)
                out[cand] = dep.candidate_share
            elif dep.strategy == "shadow":
                out[cand + " (shadow)"] = 0.0
        return out

    def to_dict(self) -> dict[str, Any]:
        dep = self.deployment
        return {
            "environment": self.environment,
            "target": self.target,
            "endpoint": self.endpoint,
            "health": self.health,
            "deployment": dep.to_dict() if dep is not None else None,
            "traffic": self.traffic,
            "replicas": self.replicas,
        }


def environment_status(
    store: MetadataStore, config: Config, *, stale_after_s: float | None = None
) -> list[EnvironmentStatus]:
    """Desired and observed state of every configured environment (and any in the store)."""
    deployments = {d.environment: d for d in store.deployments.all()}
    names = list(config.environments) + [n for n in deployments if n not in config.environments]
    out = []
    for name in names:
        env = config.environments.get(name)
        window = stale_after_s or max(10.0, 5 * (env.reconcile_interval_s if env else 1.0))
        if env is not None and env.target == "edge" and stale_after_s is None:
            window = max(window, 3 * env.edge.heartbeat_s)  # devices report less often
        replicas = [r.to_dict() for r in store.deployments.replicas(name, seen_within_s=window)]
        out.append(
            EnvironmentStatus(
                environment=name,
                target=env.target if env else deployments[name].target,
                endpoint=env.endpoint if env else (deployments[name].endpoint or ""),
                deployment=deployments.get(name),
                replicas=replicas,
            )
        )
    return out
