"""A fair pool of worker threads for the work of requests: validating them,
mapping their shared memory, decoding and encoding their tensors.

The default executor serves first come, first served, so one uid's
pipelined heavy requests queued ahead of everybody else's (a `load_model`
of a model already loaded waited 36 s behind another uid's validations).
Here work waits in one queue per key (the client's uid) and a free worker
takes from the key with the fewest jobs running, then the one served
longest ago: a request waits for at most one job of each other key. No key may hold every worker either, so while one
uid keeps them all busy another uid's job still starts at once instead of
waiting for a running one to end (a job is never interrupted).

Scheduling happens on the event loop only (no locks); jobs run in threads.
"""
from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

WORKERS = min(8, (os.cpu_count() or 1) + 2)

# What a request may carry and still be validated on the event loop: path
# checks of a few fields cost microseconds, a worker's hand-over more.
INLINE_MAX_VALUES = 256          # JSON values (objects, lists, strings, numbers ...)
INLINE_MAX_CHARS = 64 * 1024     # characters of all strings and keys
INLINE_BODY_BYTES = 2048         # a JSON body this short is small whatever it holds (no need to walk it)


@dataclass
class _Job:
    call: Callable[[], Any]
    future: asyncio.Future
    started: bool = field(default=False)


class FairPool:
    def __init__(self, workers: int = WORKERS, per_key: int | None = None,
                 thread_init: Callable[[], None] | None = None):
        self.workers = workers
        # One worker is kept for the other keys (with a single worker, it is shared).
        self.per_key = per_key if per_key is not None else max(1, workers - 1)
        # thread_init: run first in each worker thread (they run on any CPU: cpu_affinity.py).
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="hailo-worker", initializer=thread_init)
        self._queues: dict[Hashable, deque[_Job]] = {}
        self._running: dict[Hashable, int] = {}
        self._last_start: dict[Hashable, int] = {}   # keys with work: when one of theirs last started
        self._starts = itertools.count()
        self._busy = 0

    async def run(self, key: Hashable, fn: Callable, *args) -> Any:
        """``fn(*args)`` in a worker, in ``key``'s turn. Cancelled before it
        started, it never runs; after, it runs to its end (its result is dropped)."""
        job = _Job(lambda: fn(*args), asyncio.get_running_loop().create_future())
        self._queues.setdefault(key, deque()).append(job)
        self._dispatch()
        try:
            return await job.future
        finally:
            if not job.started:
                self._forget(key, job)

    def _forget(self, key: Hashable, job: _Job) -> None:
        queue = self._queues.get(key)
        if queue is not None and job in queue:
            queue.remove(job)
            self._tidy(key)

    def _tidy(self, key: Hashable) -> None:
        if not self._queues.get(key):
            self._queues.pop(key, None)
            if not self._running.get(key):
                self._running.pop(key, None)
                self._last_start.pop(key, None)

    def _next(self) -> tuple[Hashable, _Job] | None:
        """A job of the key whose turn it is: of those below ``per_key``, the one
        with the fewest jobs running, then the one served longest ago."""
        ready = [key for key in self._queues if self._running.get(key, 0) < self.per_key]
        if not ready:
            return None
        key = min(ready, key=lambda k: (self._running.get(k, 0), self._last_start.get(k, -1)))
        job = self._queues[key].popleft()
        self._last_start[key] = next(self._starts)
        self._tidy(key)
        return key, job

    def _dispatch(self) -> None:
        while self._busy < self.workers and (picked := self._next()) is not None:
            key, job = picked
            if job.future.done():  # its waiter was cancelled
                continue
            job.started = True
            self._busy += 1
            self._running[key] = self._running.get(key, 0) + 1
            loop = asyncio.get_running_loop()
            running = self._executor.submit(job.call)
            running.add_done_callback(
                lambda done, key=key, job=job: _call_soon(loop, self._finished, key, job, done))

    def _finished(self, key: Hashable, job: _Job, done: Future) -> None:
        self._busy -= 1
        self._running[key] -= 1
        self._tidy(key)
        if not job.future.done():
            if done.cancelled():
                job.future.cancel()
            elif done.exception() is not None:
                job.future.set_exception(done.exception())
            else:
                job.future.set_result(done.result())
        self._dispatch()


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass  # the loop is closed: the daemon is ending


def is_small(value: Any, max_values: int = INLINE_MAX_VALUES, max_chars: int = INLINE_MAX_CHARS) -> bool:
    """Whether ``value`` (decoded JSON) is within both bounds; stops counting
    once past them, so it costs at most about ``max_values`` steps."""
    values, chars = 0, 0
    pending = [value]
    while pending:
        item = pending.pop()
        values += 1
        if isinstance(item, (dict, list)) and values + len(pending) + len(item) > max_values:
            return False  # before iterating a container of any length
        if isinstance(item, dict):
            chars += sum(len(key) for key in item if isinstance(key, str))
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            chars += len(item)
        if values > max_values or chars > max_chars:
            return False
    return True
