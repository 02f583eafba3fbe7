"""The local target: an environment's server, supervised, in the background on this machine.

``up`` starts a detached supervisor (``loopline.drivers.targets.supervisor``) for the
environment unless one runs already, and waits until its server is alive; then it says
whether the server is ready (serving the environment's deployment) or waiting for one.
The supervisor checks liveness (``/v2/health/live``), not readiness: an environment with
nothing deployed yet is alive and never ready, and must not be restarted for it. ``down``
stops it and waits until nothing of it is left. Everything lives in
``<state_dir>/envs/<ENV>/``:

- ``supervisor.lock``: flock'd by the running supervisor for its whole life (the proof
  that it runs); ``start.lock``: flock'd by ``up`` and ``down`` while they start or stop
  one, so two concurrent ``up`` calls start exactly one supervisor;
- ``supervisor.pid``, ``state.json`` (pid, server pid, restarts, last exit code, healthy,
  since), ``supervisor.log`` and ``server.log``.

A pid file whose supervisor is gone (its lock is free) is stale: ``up`` replaces it and
``down`` removes it, and neither ever signals the pid it names.

The server is ``python -m loopline.deploy.server --env ENV --config CONFIG``: it reads the
environment's desired deployment from the metadata store and reconciles to it, so a
promotion needs no restart here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loopline.drivers.targets import Outcome, TargetContext
from loopline.drivers.targets.supervisor import (
    LOCK_FILE,
    PID_FILE,
    SERVER_LOG,
    STATE_FILE,
    SUPERVISOR_LOG,
    SupervisorPolicy,
    probe,
    read_json,
)
from loopline.errors import ConfigError

START_LOCK = "start.lock"
HEALTH_PATH = "/v2/health/live"  # what the supervisor checks: the process answers
READY_PATH = "/v2/health/ready"  # a version is loaded and serving
TAIL_LINES = 30


class LocalTarget:
    """Supervised server processes on this machine (the default target).

    ``policy`` says how the supervisor restarts and stops the server; ``fail_after`` is how
    many consecutive failed starts make ``up`` give up before its wait is over.
    """

    name = "local"

    def __init__(self, policy: SupervisorPolicy | None = None, fail_after: int = 3) -> None:
        self.policy = policy or SupervisorPolicy()
        self.fail_after = fail_after

    # -- what runs -------------------------------------------------------------------------
    def server_command(self, ctx: TargetContext) -> list[str]:
        """The server's command line for the environment."""
        return [sys.executable, "-m", "loopline.deploy.server", "--env", ctx.environment,
                "--config", str(config_path(ctx))]  # fmt: skip

    def server_environment(self, ctx: TargetContext) -> dict[str, str]:
        """Variables set for the server on top of the caller's environment."""
        return {"PYTHONUNBUFFERED": "1"}

    def folder(self, ctx: TargetContext) -> Path:
        """The environment's state folder: ``<state_dir>/envs/<ENV>``."""
        return (ctx.config.state_dir / "envs" / ctx.environment).resolve()

    def health_url(self, ctx: TargetContext) -> str:
        """Liveness: what the supervisor checks, and what ``up`` waits for."""
        return ctx.env.endpoint + HEALTH_PATH

    def ready_url(self, ctx: TargetContext) -> str | None:
        """Readiness, next to the liveness URL of a prediction server (None for a server
        whose health URL is another, e.g. the edge hub's: alive is all it reports)."""
        live = self.health_url(ctx)
        return live.removesuffix(HEALTH_PATH) + READY_PATH if live.endswith(HEALTH_PATH) else None

    # -- the interface ---------------------------------------------------------------------
    def render(self, ctx: TargetContext, out: Path) -> list[Path]:
        """A shell script running the server as ``up`` would, and a README."""
        out.mkdir(parents=True, exist_ok=True)
        lines = ["#!/bin/sh",
                 f"# The server of environment {ctx.environment} (local target), as "
                 f"`loopline up --env {ctx.environment}` runs it under its supervisor.",
                 "set -eu"]  # fmt: skip
        if ctx.env.token:  # its name only: the value is never written anywhere
            var = ctx.env.token[2:-1]
            lines.append(f': "${{{var}:?set {var} to the environment\'s token}}"')
        folder = shlex.quote(str(self.folder(ctx)))
        lines.append(f"mkdir -p {folder} && cd {folder}  # where spilled log rows go")
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.server_environment(ctx).items()]
        lines.append("exec " + shlex.join(self.server_command(ctx)))
        script = out / "run.sh"
        script.write_text("\n".join(lines) + "\n")
        script.chmod(0o755)
        readme = out / "README.md"
        readme.write_text(_README.format(env=ctx.environment, endpoint=ctx.env.endpoint,
                                         folder=self.folder(ctx)))  # fmt: skip
        return [script, readme]

    def up(self, ctx: TargetContext) -> Outcome:
        """Start the supervisor unless one runs; wait (``ctx.extra["wait_s"]``, default 60 s)
        until the server is alive, then until it serves the environment's deployment.

        With nothing deployed yet it succeeds at once, saying the server waits for one (a
        promotion makes it serve, without a restart)."""
        wait_s = float(ctx.extra.get("wait_s", 60.0))
        folder = self.folder(ctx)
        folder.mkdir(parents=True, exist_ok=True)
        ctx.env.token_value()  # the token's variable must be set before anything starts
        notes: list[str] = []
        with _flock(folder / START_LOCK):
            pid = running_supervisor(folder)
            if pid is not None:
                notes.append(f"already running (supervisor pid {pid})")
                running = (read_json(folder / STATE_FILE) or {}).get("command")
                if running and running != self.server_command(ctx):
                    notes.append(
                        f"it runs an earlier command line; `loopline down --env "
                        f"{ctx.environment}` and `up` again to apply the current one"
                    )
            else:
                stale = _read_pid(folder)
                if stale is not None:
                    notes.append(f"replaced a stale pid file (supervisor {stale} is gone)")
                    _remove(folder / PID_FILE)
                busy = _port_in_use(ctx.env.host, ctx.env.port)
                if busy:
                    return Outcome(False, f"{ctx.env.host}:{ctx.env.port} is in use by another "
                                   f"process ({busy}); stop it or change environments."
                                   f"{ctx.environment}.port")  # fmt: skip
                pid = self._spawn(ctx, folder)
                notes.append(f"started the supervisor (pid {pid})")
        return self._wait_healthy(ctx, folder, wait_s, notes)

    def down(self, ctx: TargetContext) -> Outcome:
        """SIGTERM the supervisor and wait until it and its server are gone."""
        folder = self.folder(ctx)
        if not folder.is_dir():
            return Outcome(True, f"nothing runs for environment {ctx.environment}")
        with _flock(folder / START_LOCK):
            pid = running_supervisor(folder)
            if pid is None:
                stale = _read_pid(folder)
                _remove(folder / PID_FILE)
                note = f" (removed a stale pid file naming {stale})" if stale else ""
                return Outcome(True, f"nothing runs for environment {ctx.environment}{note}")
            if pid <= 0:
                return Outcome(False, f"a supervisor of {ctx.environment} holds its lock but "
                               "wrote no pid file; try again in a moment")  # fmt: skip
            state = read_json(folder / STATE_FILE) or {}
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.policy.stop_timeout_s + 15.0
            while running_supervisor(folder) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            forced = running_supervisor(folder) is not None
            if forced:  # it did not stop: kill its whole session (its server is in it)
                _kill_session(pid)
                end = time.monotonic() + 10.0
                while running_supervisor(folder) is not None and time.monotonic() < end:
                    time.sleep(0.05)
            _reap(pid)
            server = state.get("server_pid")
            how = "killed after it ignored SIGTERM" if forced else "stopped"
            return Outcome(True, f"{how} environment {ctx.environment} (supervisor {pid})",
                           {"supervisor_pid": pid, "server_pid": server})  # fmt: skip

    def status(self, ctx: TargetContext) -> dict[str, Any]:
        """What state.json says, whether the supervisor runs, and a live health check."""
        folder = self.folder(ctx)
        pid = running_supervisor(folder) if folder.is_dir() else None
        state = (read_json(folder / STATE_FILE) or {}) if pid is not None else {}
        return {
            "target": self.name,
            "environment": ctx.environment,
            "endpoint": ctx.env.endpoint,
            "running": pid is not None,
            "supervisor_pid": pid,
            "server_pid": state.get("server_pid"),
            "phase": state.get("phase", "stopped"),
            "restarts": state.get("restarts", 0),
            "last_exit_code": state.get("last_exit_code"),
            "healthy": probe(self.health_url(ctx), timeout=2.0) if pid is not None else False,
            "ready": bool(pid is not None and (ready := self.ready_url(ctx))
                          and probe(ready, timeout=2.0)),  # fmt: skip
            "since": state.get("since"),
            "stale_pid_file": pid is None and _read_pid(folder) is not None,
            "logs": {"server": str(folder / SERVER_LOG),
                     "supervisor": str(folder / SUPERVISOR_LOG)},
        }  # fmt: skip

    # -- helpers ---------------------------------------------------------------------------
    def _spawn(self, ctx: TargetContext, folder: Path) -> int:
        """Start the supervisor detached; return its pid once it holds its lock."""
        cmd = [sys.executable, "-m", "loopline.drivers.targets.supervisor", "--dir", str(folder),
               "--health-url", self.health_url(ctx), "--policy", self.policy.to_json(),
               "--", *self.server_command(ctx)]  # fmt: skip
        env = {**os.environ, **self.server_environment(ctx)}
        with open(folder / SUPERVISOR_LOG, "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=folder, env=env,
                                    start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if _read_pid(folder) == proc.pid and running_supervisor(folder) == proc.pid:
                return proc.pid
            if proc.poll() is not None:
                raise ConfigError(
                    f"the supervisor of {ctx.environment} exited at once ({proc.returncode}): "
                    + " | ".join(tail(folder / SUPERVISOR_LOG, 5))
                )
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        raise ConfigError(f"the supervisor of {ctx.environment} did not start within 30 s")

    def _wait_healthy(
        self, ctx: TargetContext, folder: Path, wait_s: float, notes: list[str]
    ) -> Outcome:
        deadline = time.monotonic() + wait_s
        first = True
        while first or time.monotonic() < deadline:
            first = False
            pid = running_supervisor(folder)
            state = read_json(folder / STATE_FILE) or {}
            if state.get("pid") != pid:
                state = {}  # an earlier supervisor's
            details = {"endpoint": ctx.env.endpoint, "supervisor_pid": pid,
                       "server_pid": state.get("server_pid"),
                       "restarts": state.get("restarts", 0), "folder": str(folder)}  # fmt: skip
            if pid is None:
                return self._failed(ctx, folder, "its supervisor stopped", details, notes)
            if state.get("healthy") and probe(self.health_url(ctx)):
                return self._wait_ready(ctx, folder, deadline, wait_s, notes, details)
            if state.get("failures", 0) >= self.fail_after and not state.get("healthy"):
                why = f"{state['failures']} failed starts in a row"
                return self._failed(ctx, folder, why, details, notes, state)
            if wait_s <= 0:
                notes.append("not waiting for it to be healthy")
                return Outcome(True, "; ".join(notes), details)
            time.sleep(0.2)
        return self._failed(ctx, folder, f"not healthy after {wait_s:g} s", details, notes, state)

    def _wait_ready(
        self,
        ctx: TargetContext,
        folder: Path,
        deadline: float,
        wait_s: float,
        notes: list[str],
        details: dict[str, Any],
    ) -> Outcome:
        """The server is alive: is it serving its deployment, or waiting for one?"""
        url, endpoint = self.ready_url(ctx), ctx.env.endpoint
        if url is None:
            notes.append(f"healthy at {endpoint}")
            return Outcome(True, "; ".join(notes), details)
        deployed, trouble = deployed_ref(ctx)
        while True:
            ready, reason = readiness(url)
            details["ready"] = ready
            if ready:
                notes.append(f"healthy at {endpoint}" + (f", serving {deployed}" if deployed
                                                          else ""))  # fmt: skip
                return Outcome(True, "; ".join(notes), details)
            if deployed is None:
                notes.append(
                    f"running at {endpoint}, waiting for a deployment (loopline promote "
                    f"NAME:VERSION --to {ctx.environment})" + (f"; {trouble}" if trouble else "")
                )
                return Outcome(True, "; ".join(notes), details)
            if wait_s <= 0:
                notes.append(f"alive at {endpoint}; not waiting for it to serve {deployed}")
                return Outcome(True, "; ".join(notes), details)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        log_file = folder / SERVER_LOG
        message = (
            f"environment {ctx.environment} is running at {endpoint} but not serving "
            f"{deployed} after {wait_s:g} s: {reason}; it keeps trying; `loopline down "
            f"--env {ctx.environment}` stops it"
        )
        details = {**details, "log": str(log_file), "log_tail": tail(log_file, TAIL_LINES),
                   "notes": notes}  # fmt: skip
        return Outcome(False, message, details)

    def _failed(
        self,
        ctx: TargetContext,
        folder: Path,
        why: str,
        details: dict[str, Any],
        notes: list[str],
        state: dict[str, Any] | None = None,
    ) -> Outcome:
        state = state or {}
        parts = [f"environment {ctx.environment} is not serving: {why}"]
        if state.get("last_exit_code") is not None:
            parts.append(f"last exit code {state['last_exit_code']}, "
                         f"restarts {state.get('restarts', 0)}")  # fmt: skip
        if details.get("supervisor_pid"):
            parts.append(f"the supervisor keeps retrying with backoff; "
                         f"`loopline down --env {ctx.environment}` stops it")  # fmt: skip
        log_file = folder / SERVER_LOG
        details = {**details, "log": str(log_file), "log_tail": tail(log_file, TAIL_LINES),
                   "notes": notes}  # fmt: skip
        return Outcome(False, "; ".join(parts), details)


# -- readiness -------------------------------------------------------------------------------
def readiness(url: str, timeout: float = 2.0) -> tuple[bool, str]:
    """Whether ``url`` (a readiness endpoint) answers 200, and else why not, in words."""
    import json
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # on this machine
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status) == 200, f"{url} answers HTTP {response.status}"
    except urllib.error.HTTPError as err:
        try:
            why = str(json.loads(err.read()).get("error") or "")
        except (ValueError, AttributeError, OSError):
            why = ""
        return False, why or f"{url} answers HTTP {err.code}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        return False, f"{url} does not answer ({err})"


def deployed_ref(ctx: TargetContext) -> tuple[str | None, str | None]:
    """What the environment's deployment serves (``NAME:VERSION``, with a candidate's
    strategy), or None when nothing is deployed; and a note when the store is unreadable."""
    from loopline.credentials import expand_url
    from loopline.drivers.metadata.store import MetadataStore

    try:
        url = (
            expand_url(ctx.env.metadata_url, f"environments.{ctx.environment}.metadata_url")
            if ctx.env.metadata_url
            else ctx.config.metadata_url()
        )
        store = MetadataStore(url)
        try:
            dep = store.deployments.get(ctx.environment)
        finally:
            store.close()
    except Exception as err:  # any backend's error: say so, the server's answer still counts
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return None, f"cannot read its deployment from the metadata store: {line}"
    if dep is None or dep.stable_version is None:
        return None, None
    ref = str(dep.ref(dep.stable_version))
    if dep.candidate_version is not None:
        ref += f" ({dep.strategy} {dep.ref(dep.candidate_version)} at {dep.candidate_share:g})"
    return ref, None


# -- files, locks and processes --------------------------------------------------------------
def config_path(ctx: TargetContext) -> Path:
    """The config file the server reads (``ctx.extra["config_path"]``, else the project's)."""
    given = ctx.extra.get("config_path")
    return Path(given).resolve() if given else (ctx.config.root / "loopline.yaml").resolve()


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def running_supervisor(folder: Path) -> int | None:
    """The pid of the supervisor that holds the folder's lock, or None when none does."""
    path = folder / LOCK_FILE
    if not path.exists():
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(folder) or -1  # held; -1: its pid file is not written yet
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _read_pid(folder: Path) -> int | None:
    try:
        return int((folder / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now, or None when it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            return err.strerror or str(err)
    return None


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (the supervisor and its servers)."""
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                os.kill(int(entry.name), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(sid, signal.SIGKILL)


def _reap(pid: int) -> None:
    """Reap the supervisor if this process started it (else init does)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0)


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a log file (none if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


_README = """\
# Environment {env}: local target

`run.sh` runs this environment's prediction server in the foreground, exactly as
`loopline up --env {env}` runs it in the background under its supervisor. The server
reads the environment's desired deployment from the metadata store and follows it, so a
promotion or rollback needs no restart.

- Endpoint: {endpoint} (alive: `GET {endpoint}/v2/health/live`; serving a model:
  `GET {endpoint}/v2/health/ready`)
- `loopline up --env {env}`: start the supervisor (restarts the server with backoff when
  it dies or stops answering `/v2/health/live`; an environment with nothing deployed yet
  is alive, waiting for `loopline promote`); `loopline down --env {env}`: stop it and its
  server.
- State and logs: `{folder}` (`state.json`, `server.log`, `supervisor.log`).
"""
