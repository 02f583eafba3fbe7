"""A supervisor for one server process: restart with backoff, health checks, a state file.

The local target (``loopline up``) starts it detached, in a session of its own::

    python -m loopline.drivers.targets.supervisor --dir DIR --health-url URL -- CMD...

It holds an exclusive ``flock`` on ``DIR/supervisor.lock`` for its whole life: that lock,
not the pid file, proves that it runs (a pid file outlives a SIGKILLed process and may
name a reused pid). It writes ``DIR/supervisor.pid`` and keeps ``DIR/state.json`` current
(written atomically). The server's output goes to ``DIR/server.log`` (the previous run's
is kept as ``server.log.1``).

The health URL is a liveness check (the local target gives ``/v2/health/live``): a server
that answers it is healthy even while it serves nothing yet (an environment with no
deployment is alive and not ready, and a restart would not change that). The server runs
in a process group of its own, so that its workers are stopped with it, and (on Linux)
gets SIGTERM should the supervisor die. A server that exits, never becomes
healthy within ``start_timeout_s``, or stays unhealthy for ``unhealthy_timeout_s`` is
restarted after a delay that doubles with each consecutive failure (with jitter, at most
``backoff_cap_s``); one that was healthy and ran ``reset_after_s`` starts the count again.
On SIGTERM or SIGINT the server gets SIGTERM, then SIGKILL after ``stop_timeout_s``, and
the supervisor exits with nothing of it left running.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("loopline.supervisor")

LOCK_FILE = "supervisor.lock"
PID_FILE = "supervisor.pid"
STATE_FILE = "state.json"
SERVER_LOG = "server.log"
SUPERVISOR_LOG = "supervisor.log"
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class SupervisorPolicy:
    """How the supervisor restarts, health-checks and stops its server."""

    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    jitter: float = 0.2  # each delay times a random factor in [1 - jitter, 1 + jitter]
    reset_after_s: float = 60.0
    health_interval_s: float = 1.0
    start_timeout_s: float = 180.0
    unhealthy_timeout_s: float = 30.0
    stop_timeout_s: float = 40.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter {self.jitter}: allowed 0 <= jitter < 1")
        for f in fields(self):
            if f.name != "jitter" and getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be > 0, got {getattr(self, f.name)}")

    def delay(self, failures: int, rng: random.Random) -> float:
        """The wait before the restart that follows ``failures`` consecutive failures."""
        base = min(self.backoff_cap_s, self.backoff_base_s * 2.0 ** max(failures - 1, 0))
        return base * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SupervisorPolicy:
        return cls(**json.loads(text))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def probe(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers 200 (no proxy: the server is on this machine)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def group_alive(pgid: int) -> bool:
    """Whether any process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prctl(option: int, value: int) -> None:
    """Linux ``prctl``; nothing elsewhere (best effort: the supervisor works without it)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


class Supervisor:
    """Runs ``command`` and keeps it running until SIGTERM; see the module docstring."""

    def __init__(
        self,
        folder: Path,
        command: list[str],
        health_url: str,
        policy: SupervisorPolicy | None = None,
    ) -> None:
        self.folder = folder
        self.command = command
        self.health_url = health_url
        self.policy = policy or SupervisorPolicy()
        self.rng = random.Random()
        self.stopping = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.groups: set[int] = set()  # process groups of servers, until they are empty
        self.attempts = 0
        self.started = 0.0
        self.last_ok: float | None = None
        self.failures = 0
        self.restart_at = 0.0
        self.next_check = 0.0
        self.state: dict[str, Any] = {}

    # -- the life of the supervisor --------------------------------------------------------
    def run(self) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = self._lock()
        if lock is None:
            log.error("another supervisor holds %s; exiting", self.folder / LOCK_FILE)
            return 3
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, self._stop)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphaned workers come to us to be reaped
            log_file = self.folder / SERVER_LOG
            if log_file.exists():
                os.replace(log_file, self.folder / f"{SERVER_LOG}.1")
            self.state = {
                "pid": os.getpid(),
                "command": self.command,
                "health_url": self.health_url,
                "started_at": now_iso(),
                "phase": "starting",
                "server_pid": None,
                "server_started_at": None,
                "restarts": 0,
                "failures": 0,
                "last_exit_code": None,
                "last_exit_reason": None,
                "delays_s": [],
                "next_restart_at": None,
                "healthy": False,
                "since": now_iso(),
            }
            self._save()
            # Last: whoever sees this pid file finds this run's state, not an earlier one's.
            write_text_atomic(self.folder / PID_FILE, f"{os.getpid()}\n")
            log.info("supervising %s", " ".join(self.command))
            self._loop()
        finally:
            self._stop_server()
            self._update(phase="stopped", server_pid=None, healthy=False, next_restart_at=None)
            with contextlib.suppress(OSError):
                if (self.folder / PID_FILE).read_text().strip() == str(os.getpid()):
                    (self.folder / PID_FILE).unlink()
            log.info("stopped")
            lock.close()  # releases the flock: the supervisor is gone
        return 0

    def _lock(self) -> IO[str] | None:
        """The supervisor lock, waiting a little for a probe that holds it for an instant."""
        f = open(self.folder / LOCK_FILE, "a+")  # noqa: SIM115 - held for the whole run
        deadline = time.monotonic() + 10.0
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return f
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.close()
                    return None
                time.sleep(0.05)

    def _stop(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            log.info("got %s; stopping", signal.Signals(signum).name)
        self.stopping = True

    def _loop(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            self._reap_orphans()
            self._forget_empty_groups()
            if self.proc is None:
                if now >= self.restart_at:
                    self._start()
            else:
                code = self.proc.poll()
                if code is not None:
                    self._exited(code, f"exited with {code}")
                elif now >= self.next_check:
                    self._check(now)
            time.sleep(0.1)

    # -- the server ------------------------------------------------------------------------
    def _start(self) -> None:
        self.attempts += 1
        parent = os.getpid()

        def child_setup() -> None:  # in the child, before exec: die with the supervisor
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:
                os._exit(1)

        with open(self.folder / SERVER_LOG, "ab") as out:
            out.write(f"[loopline supervisor {now_iso()}] starting: {self.command}\n".encode())
            out.flush()
            try:
                self.proc = subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, cwd=self.folder, process_group=0,
                    preexec_fn=child_setup,
                )  # fmt: skip
            except OSError as err:
                out.write(f"[loopline supervisor] cannot start the server: {err}\n".encode())
                self.proc = None
                self.state["restarts"] = self.attempts - 1
                self._schedule(127, f"cannot start: {err}")
                return
        self.groups.add(self.proc.pid)
        self.started = time.monotonic()
        self.last_ok = None
        self.next_check = self.started
        log.info("server started (pid %d)", self.proc.pid)
        self._update(
            phase="running",
            server_pid=self.proc.pid,
            server_started_at=now_iso(),
            restarts=self.attempts - 1,
            next_restart_at=None,
        )

    def _check(self, now: float) -> None:
        interval = self.policy.health_interval_s
        healthy = probe(self.health_url, timeout=min(2.0, max(interval, 0.5)))
        now = time.monotonic()
        # Until its first healthy answer, look often: ``up`` is waiting for it.
        self.next_check = now + (
            interval if self.last_ok is not None or healthy else min(interval, 0.25)
        )
        if healthy:
            self.last_ok = now
        if healthy != self.state["healthy"]:
            log.info("server %s", "healthy" if healthy else "unhealthy")
            self._update(healthy=healthy, since=now_iso())
        if healthy:
            return
        if self.last_ok is None and now - self.started >= self.policy.start_timeout_s:
            self._restart(f"not healthy within {self.policy.start_timeout_s:g} s of its start")
        elif self.last_ok is not None and now - self.last_ok >= self.policy.unhealthy_timeout_s:
            self._restart(f"unhealthy for {self.policy.unhealthy_timeout_s:g} s")

    def _restart(self, why: str) -> None:
        log.warning("restarting the server: %s", why)
        code = self._terminate()
        self._exited(code, why)

    def _exited(self, code: int, why: str) -> None:
        assert self.proc is not None
        pid = self.proc.pid
        uptime = time.monotonic() - self.started
        was_healthy = self.last_ok is not None
        self.proc = None
        # What the server left behind (workers, when it was killed) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        if self.stopping:
            self._update(server_pid=None, healthy=False, last_exit_code=code)
            return
        log.warning("server (pid %d) %s after %.1f s", pid, why, uptime)
        ok_run = was_healthy and uptime >= self.policy.reset_after_s
        self.failures = 0 if ok_run else self.failures
        self._schedule(code, why)

    def _schedule(self, code: int, why: str) -> None:
        self.failures += 1
        wait = self.policy.delay(self.failures, self.rng)
        self.restart_at = time.monotonic() + wait
        delays = [*self.state["delays_s"], round(wait, 3)][-20:]
        log.info("restarting in %.2f s (consecutive failures: %d)", wait, self.failures)
        next_at = datetime.now(UTC).timestamp() + wait
        self._update(
            phase="backoff",
            server_pid=None,
            healthy=False,
            since=now_iso() if self.state["healthy"] else self.state["since"],
            failures=self.failures,
            last_exit_code=code,
            last_exit_reason=why,
            delays_s=delays,
            next_restart_at=datetime.fromtimestamp(next_at, UTC).isoformat(),
        )

    def _terminate(self) -> int:
        """SIGTERM the server, SIGKILL its group after the timeout; its exit code."""
        assert self.proc is not None
        proc = self.proc
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(self.policy.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("server (pid %d) ignored SIGTERM; killing it", proc.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def _stop_server(self) -> None:
        """Stop the server (if any) and wait until nothing of any server is left."""
        if self.proc is not None:
            self._update(phase="stopping")
            code = self._terminate()
            self._exited(code, f"stopped ({code})")
        deadline = time.monotonic() + self.policy.stop_timeout_s
        while any(group_alive(g) for g in self.groups) and time.monotonic() < deadline:
            self._reap_orphans()
            time.sleep(0.05)
        for g in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, signal.SIGKILL)
        end = time.monotonic() + 5.0
        while any(group_alive(g) for g in self.groups) and time.monotonic() < end:
            self._reap_orphans()
            time.sleep(0.02)

    def _forget_empty_groups(self) -> None:
        # An empty group's id may be reused later: never signal it again.
        current = self.proc.pid if self.proc is not None else None
        self.groups = {g for g in self.groups if g == current or group_alive(g)}

    def _reap_orphans(self) -> None:
        """Reap dead orphans (a killed server's workers come to us), never our server."""
        if not hasattr(os, "waitid"):
            return
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or (self.proc is not None and info.si_pid == self.proc.pid):
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)
                log.info("reaped orphan %d (a server's process), status %d", info.si_pid,
                         info.si_status)  # fmt: skip

    # -- state -----------------------------------------------------------------------------
    def _update(self, **changes: Any) -> None:
        self.state.update(changes)
        self._save()

    def _save(self) -> None:
        self.state["updated_at"] = now_iso()
        write_json_atomic(self.folder / STATE_FILE, self.state)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loopline.drivers.targets.supervisor")
    p.add_argument("--dir", type=Path, required=True, help="the environment's state folder")
    p.add_argument("--health-url", required=True, help="GET this; 200 means alive (healthy)")
    p.add_argument("--policy", default="{}", help="SupervisorPolicy fields as JSON")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the server command")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the server command after --")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout
    )
    return Supervisor(
        args.dir, command, args.health_url, SupervisorPolicy.from_json(args.policy)
    ).run()


if __name__ == "__main__":
    sys.exit(main())
