"""A unit of device work (:class:`Job`) and its outcome (:class:`JobFuture`).

A job is made on the event loop, waits in the device queue (scheduler.py),
runs on the device thread (device.py) and its outcome goes back to the
loop in a batch (handoff.py). :class:`JobFuture` keeps the part of
``concurrent.futures.Future`` that a job needs (one C lock, a state, one
waiter) without its condition variable, which costs a few dozen Python
calls per job on both threads.

Who settles a job: the device thread (its result or error), the queue (a
deadline that passed, a displacement, a shutdown), the loop (cancel, or
``remove`` with an answer). The first outcome wins; a later one is
ignored, so a job cancelled by its waiter and then expired in the queue
raises nothing on the device thread.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np

PRIORITIES = ("interactive", "normal", "batch")   # index = class; lower runs first (scheduler.py)
DEFAULT_PRIORITY = "normal"
PENDING, RUNNING, CANCELLED, FINISHED = "pending", "running", "cancelled", "finished"


class JobFuture:
    """A job's outcome, set once from any thread."""

    __slots__ = ("_lock", "_state", "_result", "_exception", "_callbacks", "_event")

    def __init__(self):
        self._lock = threading.Lock()
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._callbacks: list = []
        self._event: threading.Event | None = None   # made only for a blocking waiter

    # -- settling ------------------------------------------------------------

    def set_running_or_notify_cancel(self) -> bool:
        """The device thread is about to run the job: False if it was
        cancelled meanwhile (it never runs then)."""
        with self._lock:
            if self._state != PENDING:
                return False
            self._state = RUNNING
            return True

    def cancel(self) -> bool:
        """Cancel a job that has not started; True if it is cancelled now."""
        with self._lock:
            if self._state == CANCELLED:
                return True
            if self._state != PENDING:
                return False
            self._state = CANCELLED
        self._settled()
        return True

    def set_result(self, result: Any) -> bool:
        return self._settle(result, None)

    def set_exception(self, exception: BaseException) -> bool:
        return self._settle(None, exception)

    def _settle(self, result: Any, exception: BaseException | None) -> bool:
        with self._lock:
            if self._state in (CANCELLED, FINISHED):
                return False   # the first outcome stands
            self._state, self._result, self._exception = FINISHED, result, exception
        self._settled()
        return True

    def _settled(self) -> None:
        # Outside the lock: a callback may take other locks (the handoff's).
        callbacks, self._callbacks = self._callbacks, []
        if self._event is not None:
            self._event.set()
        for callback in callbacks:
            callback(self)

    # -- reading -------------------------------------------------------------

    def add_done_callback(self, callback: Callable[["JobFuture"], Any]) -> None:
        """``callback(self)`` once settled: now, on this thread, if it is already."""
        with self._lock:
            if self._state not in (CANCELLED, FINISHED):
                self._callbacks.append(callback)
                return
        callback(self)

    def done(self) -> bool:
        return self._state in (CANCELLED, FINISHED)

    def cancelled(self) -> bool:
        return self._state == CANCELLED

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._exception

    def _wait(self, timeout: float | None) -> None:
        """Block until settled (tests and synchronous callers; the loop never blocks here)."""
        with self._lock:
            if self._state not in (CANCELLED, FINISHED) and self._event is None:
                self._event = threading.Event()
            event = self._event
        if not self.done() and not event.wait(timeout):
            raise TimeoutError(f"the job did not finish within {timeout} s")
        if self._state == CANCELLED:
            raise concurrent.futures.CancelledError()


# A result with more containers and values than this is not sized on the
# device thread (it counts against its client once its answer is made) and
# is encoded by a worker, not on the event loop. A handler's result is a dict
# of outputs, a list of segments, an array or text: far fewer.
RESULT_NODES = 256


_SCALARS = frozenset((int, float, bool, type(None)))


def payload_bytes(value: Any, max_nodes: int = RESULT_NODES) -> int | None:
    """About how many bytes a job's result holds: its arrays, texts and bytes
    (handlers' results are dicts, lists and tuples of those). None when it
    has more than ``max_nodes`` containers and values: too many to look at."""
    total, pending = 0, [value]
    for _ in range(max_nodes):
        if not pending:
            return total
        item = pending.pop()
        kind = type(item)   # exact types first: the usual ones cost no isinstance
        if kind in _SCALARS:
            continue   # (the timings beside every result)
        if kind is dict or isinstance(item, dict):
            pending.extend(item.values())
        elif kind is np.ndarray or isinstance(item, np.ndarray):
            total += item.nbytes
        elif isinstance(item, (list, tuple)):
            if len(item) > max_nodes:
                return None
            pending.extend(item)
        elif isinstance(item, (str, bytes, bytearray)):
            total += len(item)
    return None if pending else total


@dataclass(eq=False)
class Job:
    fn: Callable[[], Any]
    label: str
    budget_s: float
    priority: int = PRIORITIES.index(DEFAULT_PRIORITY)
    client: Hashable = None          # fairness key (the peer's uid, "uid N")
    owner: Hashable = None           # the connection (cancel and disconnect act per connection)
    request_id: Any = None
    deadline: float | None = None    # monotonic; not started by then -> timeout
    model_key: str | None = None     # for affinity
    future: JobFuture = field(default_factory=JobFuture)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    skips: int = 0                   # times passed over for affinity
    result_bytes: int = 0            # of its result, counted to its client until answered (scheduler.py)
    result_size: int | None = None   # its result's bytes as the device thread sized them (None: not sized)
    answered: bool = False           # its answer is made (or its request gone): nothing more to count

    @property
    def batch_key(self) -> Hashable | None:
        """Jobs with one key may run in one device call (None: alone). Such a
        job's ``fn`` is an ``actions.InferCall``: it also has ``batch_limit()``
        and ``run_batch(fns)`` (device.py)."""
        return getattr(self.fn, "batch_key", None)

    def outcome(self, handoff) -> asyncio.Future:
        """The job's result on the event loop of ``handoff`` (handoff.py): one
        batched hand-over when the job settles, whichever thread settles it.
        Cancelling this future does not touch the job: its awaiter cancels
        the job itself."""
        waiter = handoff.loop.create_future()

        def settle(done: JobFuture) -> None:
            if waiter.done():
                return
            if done._state == CANCELLED:
                waiter.cancel()
            elif done._exception is not None:
                waiter.set_exception(done._exception)
            else:
                waiter.set_result(done._result)
        self.future.add_done_callback(lambda done: handoff.call(settle, done))
        return waiter
