"""Several server processes on one port, with the kernel spreading connections evenly.

uvicorn's own ``workers=N`` shares one listening socket: whichever process wakes first
accepts a whole burst of connections, so a client that opens its keep-alive connections at
once (every load balancer, every benchmark) often lands almost all of them on one process
while the other idles — measured here as 1,912 requests/s in one run and 939 in the next.
Here each process binds its own socket with ``SO_REUSEPORT`` and the kernel hashes every
new connection to one of them. The parent supervises: it restarts a worker that dies and
forwards SIGTERM/SIGINT so that every worker stops gracefully (and flushes its log).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import time
from typing import Any

log = logging.getLogger("loopline.deploy")


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


def _worker(options: dict[str, Any]) -> None:
    """One server process: its own socket, the app built by ``server.worker_app``."""
    import uvicorn

    from loopline.deploy.server import worker_app

    sock = bind_reuseport(options["host"], options["port"], options.get("backlog", 2048))
    config = uvicorn.Config(worker_app, factory=True, **options)
    uvicorn.Server(config).run(sockets=[sock])


def run_workers(n: int, options: dict[str, Any], grace_s: float = 60.0) -> None:
    """Run ``n`` worker processes until SIGTERM or SIGINT; restart any that dies."""
    # Fail fast (address in use, bad host) before starting anything.
    bind_reuseport(options["host"], options["port"]).close()
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    procs = [ctx.Process(target=_worker, args=(options,), daemon=False) for _ in range(n)]
    try:
        for p in procs:
            p.start()
        while not stopping:
            for i, p in enumerate(procs):
                if not p.is_alive() and not stopping:
                    log.warning("worker %s exited with %s; starting another", p.pid, p.exitcode)
                    procs[i] = ctx.Process(target=_worker, args=(options,), daemon=False)
                    procs[i].start()
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn stops gracefully and the log is flushed
        deadline = time.monotonic() + grace_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        for s, handler in previous.items():
            signal.signal(s, handler)
