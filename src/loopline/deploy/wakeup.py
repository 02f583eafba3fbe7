"""Handing answers from batcher threads to the event loops that wait for them.

``loop.call_soon_threadsafe`` wakes the loop while the calling thread holds the GIL. On a
busy machine the woken loop thread often preempts the batcher right there, finds the GIL
taken, and both wait for the scheduler: measured with py-spy, a batcher thread spent a
fifth of its GIL-holding time inside that one call. Here the batcher appends the answers
to a deque and wakes the loop with a write to an eventfd (a pipe where there is none),
which releases the GIL for the system call: if the woken loop thread preempts the batcher
then, the GIL is free for it. The loop reads the fd (``loop.add_reader``) and sets the
futures, one wake-up for every answer that arrived since the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

# (future, result or None, exception or None)
Answer = tuple["asyncio.Future[Any]", Any, BaseException | None]


class LoopWaker:
    """Delivers answers to one event loop from any thread; created on the loop's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: deque[list[Answer]] = deque()
        self._read_fd, self._write_fd, self._signal, self._drain_fd = _make_fds()
        self.closed = False
        # Held while the fds are written or closed: a closed fd's number may be reused at
        # once (by a database file, say), and must never be written to again.
        self._lock = threading.Lock()
        loop.add_reader(self._read_fd, self._on_readable)

    def deliver(self, answers: list[Answer]) -> bool:
        """Queue ``answers`` for the loop and wake it; False once the loop is closed."""
        with self._lock:
            if self.closed or self.loop.is_closed():
                return False
            self._pending.append(answers)
            with contextlib.suppress(OSError):  # a full pipe: a wake-up is pending anyway
                self._signal(self._write_fd)
        return True

    def _on_readable(self) -> None:  # on the loop's thread
        with contextlib.suppress(OSError):  # nothing to read: an earlier call drained it
            self._drain_fd(self._read_fd)
        pending = self._pending
        while pending:
            set_results(pending.popleft())

    def close(self) -> None:
        """Stop listening and close the fds (on the loop's thread, or once it is closed)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if not self.loop.is_closed():
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(self._read_fd)
            for fd in {self._read_fd, self._write_fd}:
                with contextlib.suppress(OSError):
                    os.close(fd)


def set_results(items: list[Answer]) -> None:
    """Resolve futures on their loop's thread; a future nobody awaits any more is skipped."""
    for fut, result, err in items:
        if fut.done():
            continue
        if err is None:
            fut.set_result(result)
        else:
            fut.set_exception(err)


class WakerSet:
    """One ``LoopWaker`` per event loop that submits jobs (usually exactly one)."""

    def __init__(self) -> None:
        self._wakers: dict[asyncio.AbstractEventLoop, LoopWaker] = {}
        self._lock = threading.Lock()

    def for_loop(self, loop: asyncio.AbstractEventLoop) -> LoopWaker:
        """The waker of ``loop``, made on first use (call on the loop's thread)."""
        waker = self._wakers.get(loop)
        if waker is not None and not waker.closed:
            return waker
        with self._lock:
            for old in [lp for lp in self._wakers if lp.is_closed()]:  # earlier loops, gone
                self._wakers.pop(old).close()
            waker = LoopWaker(loop)
            self._wakers[loop] = waker
        return waker

    def deliver(self, loop: asyncio.AbstractEventLoop, answers: list[Answer]) -> None:
        waker = self._wakers.get(loop)
        if waker is None or not waker.deliver(answers):
            # No waker (a job from a loop that never made one) or a closed loop: the
            # thread-safe call, which raises RuntimeError once nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(set_results, answers)


def _make_fds() -> tuple[int, int, Callable[[int], Any], Callable[[int], Any]]:
    """(read fd, write fd, signal, drain): an eventfd where the system has one, else a pipe.

    Both ``os.eventfd_write`` and ``os.write`` release the GIL during the system call.
    """
    if hasattr(os, "eventfd"):
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd, fd, lambda f: os.eventfd_write(f, 1), os.eventfd_read
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w, lambda f: os.write(f, b"\0"), lambda f: os.read(f, 65536)
