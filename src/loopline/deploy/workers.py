"""Several server processes on one port, with the kernel spreading connections evenly.

uvicorn's own ``workers=N`` shares one listening socket: whichever process wakes first
accepts a whole burst of connections, so a client that opens its keep-alive connections at
once (every load balancer, every benchmark) often lands almost all of them on one process
while the other idles — measured here as 1,912 requests/s in one run and 939 in the next.
Here each process binds its own socket with ``SO_REUSEPORT`` and the kernel hashes every
new connection to one of them. The parent supervises: it restarts a worker that dies, after
a delay that doubles with each consecutive crash (``RestartPolicy``), and forwards
SIGTERM/SIGINT so that every worker stops gracefully (and flushes its log).

The supervisor knows nothing of the app: it gets the app factory as an import string
(``"package.module:factory"``), which each worker imports itself.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from loopline.deploy.metrics import mark_process_dead, multiprocess_dir

log = logging.getLogger("loopline.deploy")


@dataclass(frozen=True)
class RestartPolicy:
    """How long to wait before restarting a worker that died.

    The n-th consecutive crash waits ``base_s * 2**(n-1)``, at most ``cap_s``. A worker
    that ran ``healthy_s`` or longer before it died starts the count again.
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    healthy_s: float = 30.0

    def delay(self, failures: int) -> float:
        """The wait before the restart that follows ``failures`` consecutive crashes (>= 1)."""
        return min(self.cap_s, self.base_s * 2.0 ** max(failures - 1, 0))

    def failures_after(self, failures: int, uptime_s: float) -> int:
        """The consecutive crash count once a worker that ran ``uptime_s`` has died."""
        return 1 if uptime_s >= self.healthy_s else failures + 1


def bind_reuseport(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket that other processes may bind to the same address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def _worker(app_factory: str, options: dict[str, Any], parent: int) -> None:
    """One server process: its own socket, the app built by the ``app_factory`` it imports."""
    import uvicorn

    _stop_with_parent(parent)
    sock = bind_reuseport(options["host"], options["port"], options.get("backlog", 2048))
    config = uvicorn.Config(app_factory, factory=True, **options)
    uvicorn.Server(config).run(sockets=[sock])


def _stop_with_parent(parent: int) -> None:
    """Stop gracefully (SIGTERM to itself) once the supervisor is gone, e.g. SIGKILLed:
    an orphan would keep serving on the port with nobody to stop it."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="loopline-parent-watch", daemon=True).start()


@dataclass
class _Slot:
    """One worker place: the process in it (None while a restart waits) and its crashes."""

    proc: BaseProcess | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0


def run_workers(
    n: int,
    options: dict[str, Any],
    app_factory: str,
    *,
    policy: RestartPolicy | None = None,
    grace_s: float = 60.0,
) -> None:
    """Run ``n`` worker processes until SIGTERM or SIGINT; restart any that dies."""
    policy = policy or RestartPolicy()
    # Fail fast (address in use, bad host) before starting anything.
    bind_reuseport(options["host"], options["port"]).close()
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    def start(slot: _Slot) -> None:
        slot.proc = ctx.Process(
            target=_worker, args=(app_factory, options, os.getpid()), daemon=False
        )
        slot.proc.start()
        slot.started = time.monotonic()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    slots = [_Slot() for _ in range(n)]
    try:
        for slot in slots:
            start(slot)
        while not stopping:
            now = time.monotonic()
            for slot in slots:
                if slot.proc is not None and not slot.proc.is_alive():
                    pid, code = slot.proc.pid, slot.proc.exitcode
                    _forget(slot.proc)
                    slot.proc = None
                    slot.failures = policy.failures_after(slot.failures, now - slot.started)
                    wait = policy.delay(slot.failures)
                    slot.restart_at = now + wait
                    log.warning(
                        "worker %s exited with %s; starting another in %.1f s", pid, code, wait
                    )
                if slot.proc is None and now >= slot.restart_at and not stopping:
                    start(slot)
            time.sleep(0.1)
    finally:
        procs = [s.proc for s in slots if s.proc is not None]
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn stops gracefully and the log is flushed
        deadline = time.monotonic() + grace_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
            _forget(p)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _forget(proc: BaseProcess) -> None:
    """Drop a dead worker's live gauges from the metrics (Prometheus multiprocess mode)."""
    if proc.pid is not None and multiprocess_dir() is not None:
        mark_process_dead(proc.pid)
