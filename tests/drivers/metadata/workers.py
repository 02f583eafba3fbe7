"""Concurrent callers of one metadata store: threads inside real processes.

``in_processes`` starts fresh interpreters (multiprocessing ``spawn``, as separate
``loopline`` commands are) that each run one of the functions below; every function gets
a barrier shared by all processes, and most start several threads of their own, so the
calls race both across processes and within one. A function returns plain values (an
outcome per call); an unexpected exception comes back as its traceback text.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import traceback
from collections.abc import Callable
from typing import Any

from loopline.drivers.metadata.store import MetadataStore
from loopline.errors import AliasConflict, Conflict, NotFound

TIMEOUT_S = 240


def in_processes(target: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
    """Run ``target(barrier, *a)`` for each ``a`` of ``args`` in its own process; the results."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(args), timeout=TIMEOUT_S)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_entry, args=(i, target.__name__, a, barrier, queue))
        for i, a in enumerate(args)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    try:
        for _ in procs:
            i, ok, value = queue.get(timeout=TIMEOUT_S)
            got[i] = (ok, value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():  # pragma: no cover - only when a worker hangs
                p.kill()
    failures = [value for ok, value in got.values() if not ok]
    assert not failures, "a worker process failed:\n" + "\n".join(failures)
    return [got[i][1] for i in range(len(args))]


def _entry(i: int, name: str, args: tuple[Any, ...], barrier: Any, queue: Any) -> None:
    try:
        queue.put((i, True, globals()[name](barrier, *args)))
    except BaseException:
        queue.put((i, False, traceback.format_exc()))


def _threads(n: int, call: Callable[[int], Any], barrier: Any = None) -> list[Any]:
    """``call(k)`` on ``n`` threads started together (after ``barrier``, when given)."""
    start = threading.Barrier(n + 1)
    out: list[Any] = [None] * n

    def run(k: int) -> None:
        start.wait()
        try:
            out[k] = call(k)
        except AliasConflict as err:
            out[k] = f"conflict: {err}"
        except Conflict as err:
            out[k] = f"refused: {err}"
        except BaseException as err:  # reported to the test, which fails on it
            out[k] = f"error: {type(err).__name__}: {err}"

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    if barrier is not None:
        barrier.wait()
    start.wait()
    for t in threads:
        t.join()
    return out


# -- the racing callers ------------------------------------------------------------------
def add_dataset(barrier: Any, url: str, version: str, threads: int) -> list[Any]:
    store = MetadataStore(url)
    fields = dict(name="tiny", source_uri="/lake", n_records=3, records_sha256="0" * 64)

    def call(_k: int) -> str:
        return store.datasets.add(version=version, **fields).version

    try:
        return _threads(threads, call, barrier)
    finally:
        store.close()


def move_aliases(
    barrier: Any, url: str, name: str, plans: list[list[tuple[str, int]]]
) -> list[Any]:
    """Each thread makes the moves of one plan, in order; returns 'ok' or the error."""
    store = MetadataStore(url)

    def call(k: int) -> str:
        for alias, version in plans[k]:
            store.models.set_alias(name, alias, version, actor=f"t{k}")
        return "ok"

    try:
        return _threads(len(plans), call, barrier)
    finally:
        store.close()


def cas_alias(
    barrier: Any, url: str, name: str, alias: str, targets: list[int], expected: int | None
) -> list[Any]:
    """One compare-and-set move per target; 'won:<target>' or 'conflict: ...'."""
    store = MetadataStore(url)

    def call(k: int) -> str:
        store.models.set_alias(name, alias, targets[k], expected=expected)
        return f"won:{targets[k]}"

    try:
        return _threads(len(targets), call, barrier)
    finally:
        store.close()


def register(barrier: Any, url: str, name: str, shas: list[str]) -> list[Any]:
    """One registration per sha; each gives [version, created]."""
    store = MetadataStore(url)

    def call(k: int) -> list[Any]:
        reg = store.models.register(name, bundle_uri=f"/b/{shas[k]}", bundle_sha256=shas[k])
        return [reg.version.version, reg.created]

    try:
        return _threads(len(shas), call, barrier)
    finally:
        store.close()


def open_new_stores(barrier: Any, urls: list[str]) -> list[str]:
    """Open each of ``urls`` (new stores) at the same moment as the other processes."""
    out = []
    for url in urls:
        barrier.wait()
        try:
            store = MetadataStore(url)
            store.runs.recent()
            store.close()
            out.append("ok")
        except BaseException as err:  # every outcome is reported; the test wants all "ok"
            out.append(f"error: {type(err).__name__}: {str(err).splitlines()[0]}")
    return out


def claim(barrier: Any, url: str, run_id: str, threads: int) -> list[Any]:
    """``threads`` claims of one run; each gives [won, pid that holds the run after]."""
    store = MetadataStore(url)

    def call(_k: int) -> list[Any]:
        result = store.runs.claim(run_id)
        return [result.won, result.run.pid]

    try:
        out = _threads(threads, call, barrier)
        barrier.wait()  # stay alive until every claim is made: a dead winner may be taken over
        return out
    finally:
        store.close()


def archive_or_alias(
    barrier: Any, url: str, names: list[str], process: int, threads: int
) -> list[Any]:
    """Per name (one round each, started together in every process): even threads archive
    ``name:2``, odd ones point an alias of their own at it; the outcomes by round."""
    store = MetadataStore(url)
    rounds = []

    def call(name: str, k: int) -> str:
        if k % 2 == 0:
            store.models.archive_version(name, 2, actor=f"p{process}t{k}")
            return "archived"
        store.models.set_alias(name, f"a{process}{k}", 2, actor=f"p{process}t{k}")
        return "aliased"

    try:
        for name in names:
            rounds.append(_threads(threads, lambda k, name=name: call(name, k), barrier))
        return rounds
    finally:
        store.close()


def release_calls(barrier: Any, url: str, plans: list[list[tuple[str, int]]]) -> list[str]:
    """Each plan on its own thread: ("promote", V), ("canary", V) or ("rollback", 0) calls
    of the release library; per call "ok:<generation>" or the refusal's text."""
    from loopline.deploy import release

    store = MetadataStore(url, migrate=False)

    def run(k: int) -> list[str]:
        out = []
        for op, version in plans[k]:
            try:
                if op == "rollback":
                    dep = release.rollback(store, "vehicles", actor=f"t{k}")
                else:
                    strategy = "direct" if op == "promote" else op
                    dep = release.promote(
                        store, f"vehicles:{version}", strategy=strategy, share=0.2,
                        actor=f"t{k}", require_replica_test=False,
                    )  # fmt: skip
                out.append(f"ok:{dep.generation}")
            except (Conflict, NotFound) as err:
                out.append(f"refused: {err}")
        return out

    got = _threads(len(plans), run, barrier)
    store.close()
    return [r for thread in got for r in (thread if isinstance(thread, list) else [thread])]
