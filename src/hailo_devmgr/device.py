"""The device thread and the VDevice it owns.

HailoRT objects must be created, used and released by one thread: this
one. Everything else hands it work through :meth:`DeviceThread.submit`,
which returns a ``concurrent.futures.Future`` the event loop can await.

Health, for the systemd watchdog: the thread records when its current
operation started and how long that kind of operation may take. A call
stuck past its budget makes :meth:`DeviceThread.health` report a problem, so
the server stops the WATCHDOG=1 pings and systemd restarts the daemon.

Locking: ``_current`` is written by the device thread and read by the event
loop; it is one tuple assigned at once (atomic in CPython), so no lock.
The job queue has its own lock inside.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .backends import Backend, BackendUnavailable, DeviceIdentity
from .protocol import DEVICE_UNAVAILABLE, SHUTTING_DOWN, RequestError

log = logging.getLogger(__name__)

IDLE_TICK_S = 5.0  # how often an idle device thread refreshes the temperature


@dataclass
class Job:
    fn: Callable[[], Any]
    label: str
    budget_s: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued_at: float = field(default_factory=time.monotonic)


class FifoQueue:
    """First come, first served. The scheduler replaces it (same methods)."""

    def __init__(self):
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise RequestError(SHUTTING_DOWN, "The device manager is shutting down")
            self._jobs.append(job)
            self._cond.notify()

    def get(self, timeout: float) -> Job | None:
        """The next job, or None after ``timeout`` seconds or once closed and empty."""
        with self._cond:
            if not self._jobs and not self._closed:
                self._cond.wait(timeout)
            return self._jobs.popleft() if self._jobs else None

    def close(self) -> list[Job]:
        """Refuse new jobs; return the ones still waiting."""
        with self._cond:
            self._closed = True
            waiting = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
            return waiting

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._jobs)


class DeviceThread:
    def __init__(self, runtime: "DeviceRuntime", queue: FifoQueue | None = None):
        self.runtime = runtime
        self.queue = queue or FifoQueue()
        self._current: tuple[str, float, float] | None = None  # (label, started, budget)
        self._thread = threading.Thread(target=self._main, name="hailo-device", daemon=True)
        self._started = threading.Event()

    # -- event loop side ----------------------------------------------------

    def start(self, open_budget_s: float) -> None:
        self._thread.start()
        # The first device open happens before READY, so status is meaningful
        # from the first request; it is bounded like any other operation.
        self._started.wait(open_budget_s)

    def submit(self, fn: Callable[[], Any], *, label: str, budget_s: float) -> concurrent.futures.Future:
        job = Job(fn, label, budget_s)
        self.queue.put(job)
        return job.future

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def busy_with(self) -> str | None:
        current = self._current
        return current[0] if current else None

    def health(self) -> str | None:
        """None when healthy, else why not (for logs and the watchdog)."""
        if not self._thread.is_alive():
            return "device thread is not running"
        current = self._current
        if current is not None:
            label, started, budget = current
            elapsed = time.monotonic() - started
            if elapsed > budget:
                return f"device operation {label} has run {elapsed:.0f} s, over its {budget:.0f} s budget"
        return None

    def stop(self, timeout_s: float) -> bool:
        """Answer queued work with shutting_down, finish the running job,
        release models and device. True when the thread ended in time."""
        for job in self.queue.close():
            job.future.set_exception(RequestError(SHUTTING_DOWN, "The device manager is shutting down"))
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- device thread ------------------------------------------------------

    def _main(self) -> None:
        self._run_guarded("open device", self.runtime.budgets.other_budget_s, self.runtime.open)
        self._started.set()
        while True:
            job = self.queue.get(IDLE_TICK_S)
            if job is None:
                if self.queue.closed:
                    break
                self._run_guarded("refresh temperature", self.runtime.budgets.other_budget_s,
                                  self.runtime.refresh_temperature)
                continue
            self._run_job(job)
        self._run_guarded("close device", self.runtime.budgets.other_budget_s, self.runtime.close)

    def _run_job(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        self._current = (job.label, time.monotonic(), job.budget_s)
        try:
            result = job.fn()
        except BaseException as exc:  # handed to the waiting request, never lost
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
        finally:
            self._current = None

    def _run_guarded(self, label: str, budget_s: float, fn: Callable[[], Any]) -> None:
        self._current = (label, time.monotonic(), budget_s)
        try:
            fn()
        except Exception:
            log.exception("device thread: %s failed", label)
        finally:
            self._current = None


class DeviceRuntime:
    """The VDevice: open, identity, temperature, broken state. Device thread only,
    except the read-only ``snapshot`` attributes the event loop reads."""

    def __init__(self, backend: Backend, retry_s: float, budgets):
        self.backend = backend
        self.retry_s = retry_s
        self.budgets = budgets
        self.vdevice: Any = None
        self.identity = DeviceIdentity(None, None, None)
        self.temperature_c: float | None = None
        self.broken_reason: str | None = None
        self._last_attempt = float("-inf")
        self.on_close: list[Callable[[], None]] = []  # release model objects first

    @property
    def platform(self):
        return self.backend.platform

    def open(self) -> None:
        self._last_attempt = time.monotonic()
        try:
            self.vdevice = self.backend.open_vdevice()
        except BackendUnavailable as exc:
            self.broken_reason = str(exc)
            log.error("device unavailable: %s", exc)
            return
        self.broken_reason = None
        self.identity = self.backend.identify(self.vdevice)
        self.refresh_temperature()
        log.info("device open: %s %s firmware %s (backend %s)", self.identity.architecture,
                 self.identity.device_id, self.identity.fw_version, self.backend.name)

    def require(self) -> Any:
        """The open VDevice; reopens a lost one at most every ``retry_s``."""
        if self.vdevice is None and time.monotonic() - self._last_attempt >= self.retry_s:
            self.open()
        if self.vdevice is None:
            raise RequestError(DEVICE_UNAVAILABLE, f"Device unavailable: {self.broken_reason}")
        return self.vdevice

    def mark_broken(self, reason: str) -> None:
        """A runtime fault: drop every model and the VDevice; the next request reopens."""
        log.error("device runtime broken: %s", reason)
        self.close()
        self.broken_reason = reason

    def refresh_temperature(self) -> None:
        if self.vdevice is not None:
            self.temperature_c = self.backend.temperature(self.vdevice)

    def close(self) -> None:
        for release in self.on_close:
            release()
        if self.vdevice is not None:
            vdevice, self.vdevice = self.vdevice, None
            self.backend.close_vdevice(vdevice)
            log.info("device released")
