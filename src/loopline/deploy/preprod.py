"""Pre-production: ``deploy`` stages a candidate in a replica of production and tests it.

``deploy(config, store, "vehicles:3", env="staging")``:

1. checks the rules and reads the candidate's test split and the recorded production
   requests to replay (before anything is started, so that a mistake costs nothing);
2. stages the candidate (``release.stage``): the environment's desired state serves it;
3. if the environment's servers run (replicas reported recently and alive, e.g.
   started by ``loopline up --env staging``), waits until every one of them serves the
   new generation; otherwise starts a temporary local server for it with the serving
   settings of the environment it replicates (production's, with the environment's own on
   top; capture off, as the test's requests are no production data) and waits until each
   of its workers does (a worker still loading would answer 503, and the test allows no
   error by default);
4. runs the replica test (``loopline.deploy.replica``) through its HTTP API;
5. stops the temporary server (SIGTERM to its process group, nothing left running);
6. records the outcome (``store.replica_tests``, which ``release.promote`` checks) and
   writes the report to ``<state_dir>/replica-tests/<id>.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from loopline.deploy.replica import ReplicaTestReport, run_replica_test
from loopline.deploy.replica_inputs import load_test_split, replay_sample
from loopline.deploy.replica_procs import alive, group_members, process_tree
from loopline.errors import ConfigError, Conflict, LooplineError

if TYPE_CHECKING:
    from datetime import datetime

    from loopline.config import Config
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.deployments import ReplicaState
    from loopline.drivers.metadata.replica_tests import ReplicaTestRecord
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.environments import EnvironmentConfig
    from loopline.pipeline.step import Reporter

REPORTS_DIR = "replica-tests"
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 6


class ReplicaStartFailed(LooplineError):
    """The replica server did not start, or did not serve the candidate in time."""


@dataclass
class DeployResult:
    """A finished replica test: the report, its record, and the JSON file written."""

    report: ReplicaTestReport
    record: ReplicaTestRecord
    path: Path

    @property
    def passed(self) -> bool:
        return self.report.passed


@dataclass
class Replica:
    """Where the candidate is served for the test, and which processes serve it."""

    url: str
    pids: list[int] | None  # None: not on this machine
    how: dict[str, Any]


def replica_settings(config: Config, env: str) -> dict[str, Any]:
    """The ServeSettings a replica of ``env`` runs with: those of the environment it
    replicates, the environment's own on top, and its host, port and token."""
    envc = config.environment(env)
    live = config.environments.get(envc.replica_of) if envc.replica_of else None
    return {**(live.serve if live is not None else {}), **envc.serve_overrides()}


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _answers(url: str, path: str = "/v2/health/ready", timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}{path}", timeout=timeout, trust_env=False).is_success
    except httpx.HTTPError:
        return False


def _window(envc: EnvironmentConfig) -> float:
    """How recent a replica's heartbeat must be for the replica to count as running."""
    return max(10.0, 5 * envc.reconcile_interval_s)


def _serving(r: ReplicaState, generation: int, version: int) -> bool:
    """Whether replica ``r`` reports ``generation`` (or later) with ``version`` loaded."""
    return r.generation >= generation and version in r.versions and r.status == "ok"


def _described(reps: list[ReplicaState]) -> str:
    return ", ".join(f"{r.replica_id} (generation {r.generation}, versions {r.versions}, "
                     f"{r.status})" for r in reps) or "none"  # fmt: skip


def _tail(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no server log)"
    return " | ".join(lines[-LOG_TAIL_LINES:]) or "(the server wrote nothing)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL what is left after the timeout."""
    group = proc.pid  # started in a session of its own: its group id is its pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # workers that outlived their parent
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _dies_with_us() -> Callable[[], None] | None:
    """The ``preexec_fn`` that makes the server get SIGTERM when this process dies (Linux).

    A monitor SIGKILLed during the replica step would otherwise leave the server (in a
    session of its own) serving with nobody to stop it. ``prctl`` is looked up here, in
    the parent: the child only calls it between fork and exec. If this process died
    before the child set it, the child was orphaned already and ends at once. Note that
    Linux signals the child when the *thread* that started it ends: the server is stopped
    by the same call that starts it (``temporary_server``), so that thread outlives it.
    None elsewhere, or when libc has no ``prctl`` (the server is then stopped as before).
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, sig = os.getpid(), int(signal.SIGTERM)

    def setup() -> None:  # in the child, after setsid (start_new_session), before exec
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody would signal us
            os._exit(1)

    return setup


@contextlib.contextmanager
def temporary_server(
    config: Config, config_path: Path, env: str, store: MetadataStore, name: str,
    version: int, timeout_s: float, generation: int | None = None,
) -> Iterator[Replica]:  # fmt: skip
    """A local server for ``env`` (staged to serve ``name:version``) until the block ends.

    The block starts once every worker of the server (``workers`` of its settings) reports
    ``generation`` (default: the environment's current one) with ``version`` loaded: with
    several workers on one port, one still loading would answer 503.
    """
    from pydantic import ValidationError

    from loopline.deploy.settings import ENV_PREFIX, ServeSettings

    envc = config.environment(env)
    # Capture off: the test's own requests are no production data to keep.
    options = {**replica_settings(config, env), "capture": False}
    if not options.get("port"):
        options["port"] = _free_port(envc.host)
    try:
        settings = ServeSettings(**{**options, "metadata_url": store.url})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"environment {env}: serve setting {where}: {first['msg']}") from None
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}"
    # The server follows the environment's desired state, which serves the candidate now.
    cmd = [sys.executable, "-m", "loopline.deploy.server", "--env", env, "--config",
           str(config_path), "--host", settings.host, "--port", str(settings.port),
           "--log-level", "warning"]  # fmt: skip
    folder = config.state_dir / REPORTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"server-{env}-{settings.port}-{os.getpid()}.log"
    # Settings (the token among them) go by environment variables, never on the command
    # line; none is inherited from this process, so the replica runs exactly these.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    child_env = {**inherited, **settings.to_env()}
    with open(log, "wb") as out:
        # A group of its own (``_stop`` signals it), ended by SIGTERM should this process die.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env,
                                cwd=config.root, start_new_session=True,
                                preexec_fn=_dies_with_us())  # fmt: skip
    clean = False
    try:
        if generation is None:
            staged = store.deployments.get(env)
            generation = staged.generation if staged is not None else 0
        here, window = socket.gethostname(), _window(envc)
        deadline = time.monotonic() + timeout_s
        while True:
            tree = set(process_tree([proc.pid]))
            reported = [r for r in store.deployments.replicas(env, seen_within_s=window)
                        if r.pid in tree and r.host in (None, here)]  # fmt: skip
            serving = [r for r in reported if _serving(r, generation, version)]
            if len(serving) >= settings.workers and _answers(url, timeout=1.0):
                break
            if proc.poll() is not None:
                raise ReplicaStartFailed(
                    f"the replica server for {name}:{version} exited with code "
                    f"{proc.returncode} before it was ready: {_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise ReplicaStartFailed(
                    f"the replica server for {name}:{version} was not serving it at {url} "
                    f"after {timeout_s:g} s (replica_test.timeout_s): {len(serving)} of "
                    f"{settings.workers} worker(s) serve generation {generation}; replicas: "
                    f"{_described(reported)}; {_tail(log)}"
                )
            time.sleep(0.1)
        how = {"started": "temporary", "command": " ".join(cmd[1:]), "pid": proc.pid,
               "settings": _shown(settings)}  # fmt: skip
        yield Replica(url, [proc.pid], how)
        clean = True
    finally:
        ours = set(process_tree([proc.pid]))  # the server and its workers, which report
        _stop(proc)
        for r in store.deployments.replicas(env):  # their heartbeats must not pass for a
            if r.pid in ours and r.host in (None, socket.gethostname()):  # running server
                store.deployments.remove_replica(env, r.replica_id)
        if clean:
            log.unlink(missing_ok=True)


def _shown(settings: Any) -> dict[str, Any]:
    secret = {"token", "capture_read_token", "metadata_url", "artifacts_url"}
    out = settings.model_dump(mode="json", exclude=secret)
    return {k: v for k, v in out.items() if v is not None}


def _live_replicas(store: MetadataStore, env: str, envc: EnvironmentConfig) -> list[ReplicaState]:
    reps = store.deployments.replicas(env, seen_within_s=_window(envc))
    return [r for r in reps if _answers(r.endpoint or envc.endpoint, "/v2/health/live")]


def _running_replica(
    store: MetadataStore, env: str, envc: EnvironmentConfig, generation: int, version: int,
    timeout_s: float,
) -> Replica:  # fmt: skip
    """Wait until every running replica of ``env`` serves ``generation`` with ``version``.

    A replica counts while its heartbeat is recent (one on this machine also while its
    process lives): one still loading, or on the previous generation, would answer the
    test's requests with 503 or 404.
    """
    deadline = time.monotonic() + timeout_s
    here = socket.gethostname()
    while True:
        reps = [r for r in store.deployments.replicas(env, seen_within_s=_window(envc))
                if r.pid is None or r.host not in (None, here) or alive(r.pid)]  # fmt: skip
        current = [r for r in reps if _serving(r, generation, version)]
        if current and len(current) == len(reps):
            url = current[0].endpoint or envc.endpoint
            local = [r.pid for r in current if r.pid is not None and r.host in (None, here)]
            how = {"started": "running", "replicas": [r.replica_id for r in current]}
            return Replica(url, local or None, how)
        if time.monotonic() > deadline:
            raise ReplicaStartFailed(
                f"{env}'s servers did not all serve version {version} (generation "
                f"{generation}) within {timeout_s:g} s (replica_test.timeout_s): "
                f"{len(current)} of {len(reps)} do; replicas: {_described(reps)}; see "
                "`loopline status`"
            )
        time.sleep(0.2)


def _check_environment(config: Config, env: str) -> EnvironmentConfig:
    envc = config.environment(env)
    replicated_by = [n for n, e in config.environments.items() if e.replica_of == env]
    if replicated_by:
        raise ConfigError(
            f"{env} is a live environment ({', '.join(replicated_by)} replicates it): deploy "
            f"to a pre-production one (e.g. --env {replicated_by[0]}) and release to {env} "
            "with `loopline promote`"
        )
    return envc


def write_report(config: Config, record: ReplicaTestRecord) -> Path:
    """Write a recorded replica test to ``<state_dir>/replica-tests/<id>.json``."""
    folder = config.state_dir / REPORTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record.id}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"id": record.id, **record.report}, indent=2, default=str))
    os.replace(tmp, path)
    return path


def deploy(
    config: Config,
    store: MetadataStore,
    ref: str,
    env: str = "staging",
    actor: str | None = None,
    *,
    config_path: Path | None = None,
    artifacts: ArtifactStore | None = None,
    reporter: Reporter | None = None,
    reason: str | None = None,
    replay_since: datetime | None = None,
) -> DeployResult:
    """Stage ``ref`` in ``env``, run its replica test and record the outcome.

    ``replay_since`` replays only requests predicted from then on (a retrained
    candidate's: what it was not trained on).

    ``config_path`` is the config file a temporary server reads (default: the project's
    ``loopline.yaml``). Raises LooplineError when the test cannot run (an unknown model,
    a rule naming an unknown metric, a replica that does not start); a candidate that
    fails it is not an error: the result says so, and ``release.promote`` refuses it.
    """
    from loopline.builder.gate import GateParams, check_metrics, parse_rule
    from loopline.deploy import release
    from loopline.drivers.artifacts import ArtifactStore

    actor = actor or release.default_actor()
    envc = _check_environment(config, env)
    policy = envc.replica_test
    mv = store.models.resolve(ref)
    name, version = mv.name, mv.version
    if mv.archived_at is not None:
        raise Conflict(f"{name}:{version} is archived; unarchive it before deploying it")
    rules = policy.rules if policy.rules is not None else list(config.gate.rules)
    params = GateParams(rules=rules, compare_to=None, labels=config.data.labels, name=name)
    for rule in rules:
        parse_rule(rule)
    check_metrics(params, list(config.evaluate.segments))
    path = Path(config_path or config.root / "loopline.yaml").resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (the replica server reads it)")
    artifacts = artifacts or ArtifactStore(config.artifacts_url())
    split = load_test_split(config, store, artifacts, mv, max_images=policy.max_test_images,
                            reporter=reporter)  # fmt: skip
    sample = replay_sample(store, artifacts, envc.replica_of, policy.replay, since=replay_since)
    running = bool(_live_replicas(store, env, envc))
    if not running and envc.target != "local":
        raise ConfigError(
            f"{env} runs on target {envc.target!r} and none of its servers reports: start "
            f"them (`loopline up --env {env}`), or set its target to local for a temporary "
            "replica on this machine"
        )
    with _one_test_at_a_time(config, env):
        return _stage_and_test(config, store, env, envc, policy, rules, split, sample, running,
                               path, name, version, actor, reason, reporter)  # fmt: skip


@contextlib.contextmanager
def _one_test_at_a_time(config: Config, env: str) -> Iterator[None]:
    """An exclusive lock on the environment's replica test: an environment has one desired
    state, so two tests at once would test each other's candidate."""
    import fcntl

    folder = config.state_dir / "envs" / env
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "replica-test.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise Conflict(
                f"a replica test is already running in {env} ({holder}); wait for it to finish"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stage_and_test(
    config: Config,
    store: MetadataStore,
    env: str,
    envc: Any,
    policy: Any,
    rules: list[str],
    split: Any,
    sample: Any,
    running: bool,
    path: Path,
    name: str,
    version: int,
    actor: str,
    reason: str | None,
    reporter: Reporter | None,
) -> DeployResult:
    from loopline.deploy import release

    state = release.stage(store, f"{name}:{version}", env=env, env_config=envc, actor=actor,
                          reason=reason or "replica test")  # fmt: skip
    settings = replica_settings(config, env)
    batch = min(16, int(settings.get("max_images_per_request") or 64))
    with contextlib.ExitStack() as stack:
        if running:
            replica = _running_replica(store, env, envc, state.generation, version,
                                       policy.timeout_s)  # fmt: skip
        else:
            replica = stack.enter_context(
                temporary_server(
                    config, path, env, store, name, version, policy.timeout_s, state.generation
                )  # fmt: skip
            )
        roots = replica.pids
        report = run_replica_test(
            replica.url, name, version, policy=policy, rules=rules, test_split=split,
            replay=sample, pids=(lambda: list(roots)) if roots else None,
            token=envc.token_value(), segments=config.evaluate.segments, batch_size=batch,
            environment=env, reporter=reporter,
        )  # fmt: skip
        report.server = {**replica.how, "generation": state.generation}
    if not running:
        report.server["left_running"] = group_members(replica.pids[0]) if replica.pids else []
    record = store.replica_tests.record(
        name, version, environment=env, passed=report.passed, reasons=report.reasons,
        report=report.to_dict(), started_at=report.started_at, actor=actor,
    )  # fmt: skip
    return DeployResult(report, record, write_report(config, record))
