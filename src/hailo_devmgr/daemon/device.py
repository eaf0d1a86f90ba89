"""The device thread and the VDevice it owns.

HailoRT objects must be created, used and released by one thread: this
one. Everything else hands it work through :meth:`DeviceThread.submit`,
which returns a :class:`~hailo_devmgr.daemon.jobs.Job` whose outcome the
event loop awaits (``Job.outcome``).

Between jobs (and when idle) the thread does its chores, each when it is
due: rebuild the VDevice after a runtime fault (bounded attempts with
backoff), read the chip temperature (the thermal guard's input), and the
registry's chores (unload idle models, reload pinned models after a
rebuild). It sleeps until the next chore is due or a job arrives.

Jobs for one model that would run one after the other run as one batch
(:meth:`DeviceThread._run_batch`): one device call for all of them, each
settled on its own (see ``Job.batch_key``).

Health, for the systemd watchdog: the thread records when its current
operation started and how long that kind of operation may take. A call
stuck past its budget makes :meth:`DeviceThread.health` report a problem, so
the server stops the WATCHDOG=1 pings and systemd restarts the daemon. A job
made of phases (an infer that loads its model on demand) starts each with
:func:`begin_phase`, so each phase has its own budget, never their sum.

Locking: ``_current`` is written by the device thread and read by the event
loop; it is one tuple assigned at once (atomic in CPython), so no lock.
The job queue has its own lock inside. ``DeviceRuntime``'s public
attributes (broken reason, temperature, throttled, counters) are written
by the device thread only and read by the event loop, each assigned whole.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import lending
from .backends import Backend, BackendUnavailable, DeviceIdentity
from .cpu_affinity import CpuPlacement
from ..wire.protocol import DEVICE_UNAVAILABLE, OVERHEATED, RequestError, shutting_down
from .jobs import Job, payload_bytes
from .scheduler import FairScheduler, JobQueue
from .settings import Settings

log = logging.getLogger(__name__)

IDLE_TICK_S = 5.0  # longest sleep of an idle device thread between chore checks
# A fault within this long of a rebuild continues the same series of
# attempts (with its backoff and limit) instead of starting a new one, so a
# device that breaks again at once (e.g. reloading a pin) cannot loop.
STABLE_AFTER_S = 60.0


# The DeviceThread whose thread this is (set on that thread only).
_this_thread = threading.local()


def begin_phase(label: str, budget_s: float) -> None:
    """From a job, on the device thread: what follows is ``label``, budgeted
    ``budget_s`` from now for the watchdog (in place of what came before)."""
    device = getattr(_this_thread, "device", None)
    if device is not None:
        device._current = (label, time.monotonic(), budget_s)


@dataclass
class Chore:
    """Housekeeping the device thread does between jobs.

    ``due()`` gives the monotonic time the chore wants to run (None: nothing
    to do); ``run()`` must move that time on (or clear it), so a failing
    chore cannot spin. ``budget_s()`` bounds it for the watchdog.
    """

    label: str
    due: Callable[[], float | None]
    run: Callable[[], Any]
    budget_s: Callable[[], float]


class DeviceThread:
    def __init__(self, runtime: "DeviceRuntime", queue: JobQueue | None = None,
                 chores: list[Chore] | None = None):
        self.runtime = runtime
        self.queue = queue if queue is not None else FairScheduler()  # (an empty queue is falsy)
        other = lambda: runtime.budgets.other_budget_s  # noqa: E731 - read at run time (settings.py)
        # The runtime's own chores first: a rebuilt device before anything else.
        self.chores: list[Chore] = [
            Chore("rebuild device", runtime.rebuild_due, runtime.rebuild, other),
            Chore("refresh temperature", runtime.temperature_due, runtime.refresh_temperature, other),
            *(chores or []),
        ]
        self._current: tuple[str, float, float] | None = None  # (label, started, budget)
        self._thread = threading.Thread(target=self._main, name="hailo-device", daemon=True)
        self._started = threading.Event()
        self._wake_scheduled = False   # a wake-up is on the event loop's list (submit)
        self.batched_requests = 0      # jobs that shared a device call with others (status)

    # -- event loop side ----------------------------------------------------

    def start(self, open_budget_s: float) -> None:
        self._thread.start()
        # The first device open happens before READY, so status is meaningful
        # from the first request; it is bounded like any other operation.
        self._started.wait(open_budget_s)

    def submit(self, fn: Callable[[], Any], *, label: str, budget_s: float,
               loop: asyncio.AbstractEventLoop | None = None, **fields) -> Job:
        """Queue ``fn`` for the device thread; ``fields`` are the scheduling
        ones of :class:`~hailo_devmgr.daemon.jobs.Job` (priority, client, ...).
        Raises ``busy`` when the queue is full.

        With ``loop`` (the caller's running event loop) a sleeping device
        thread is woken once per pass of that loop, after every job the pass
        queued: under load several jobs cost one wake-up, and the thread
        takes the GIL once for all of them instead of once per request."""
        job = Job(fn, label, budget_s, **fields)
        if loop is None:
            self.queue.put(job)
            return job
        self.queue.put(job, wake=False)
        if not self._wake_scheduled:
            self._wake_scheduled = True
            loop.call_soon(self._wake)
        return job

    def _wake(self) -> None:
        self._wake_scheduled = False
        self.queue.wake()

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
            job.future.set_exception(shutting_down())
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- device thread ------------------------------------------------------

    def _main(self) -> None:
        _this_thread.device = self
        if self.runtime.loan is None:   # lent before a restart: the borrower may hold it
            self._run_guarded("open device", self.runtime.budgets.other_budget_s, self.runtime.open)
        self._started.set()
        while True:
            sleep_s = self._do_chores() if not self.queue.closed else self._sleep_s()
            job = self.queue.get(sleep_s)
            if job is None:
                if self.queue.closed:
                    break
                continue
            batch = self._batch_of(job)
            if len(batch) > 1:
                self._run_batch(batch)
            else:
                self._run_job(job)
        self._run_guarded("close device", self.runtime.budgets.other_budget_s, self.runtime.close)

    def _do_chores(self) -> float:
        """Run the chores that are due; returns the sleep until the next one
        (one look at each chore between jobs, two when one ran: a chore may
        make another due)."""
        ran, sleep = False, IDLE_TICK_S
        for chore in self.chores:
            due = self._due(chore)
            if due is None:
                continue
            now = time.monotonic()
            if due <= now:
                self._run_guarded(chore.label, chore.budget_s(), chore.run)
                ran = True
            else:
                sleep = min(sleep, due - now)
        return self._sleep_s() if ran else sleep

    def _sleep_s(self) -> float:
        """Until the next chore is due (a job wakes the thread earlier)."""
        now = time.monotonic()
        sleep = IDLE_TICK_S
        for chore in self.chores:
            due = self._due(chore)
            if due is not None:
                sleep = min(sleep, max(due - now, 0.0))
        return sleep

    @staticmethod
    def _due(chore: Chore) -> float | None:
        try:
            return chore.due()
        except Exception:
            log.exception("device thread: checking %s failed", chore.label)
            return None

    def _batch_of(self, job: Job) -> list[Job]:
        """``job`` and the jobs to run in one device call with it (see jobs.Job.batch_key)."""
        if job.batch_key is None or not self.queue:   # (no lock: nothing waiting now is all it asks)
            return [job]
        try:
            most = job.fn.batch_limit() - 1
        except Exception:
            log.exception("device thread: sizing a batch failed")
            most = 0
        return [job, *self.queue.take_along(job, most)] if most > 0 else [job]

    def _run_job(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # its client went away while it waited
        job.started_at = time.monotonic()
        self._current = (job.label, job.started_at, job.budget_s)
        result = error = None
        try:
            result = job.fn()
        except BaseException as exc:  # handed to the waiting request, never lost
            error = exc
        finally:
            self._current = None
            # Timestamps first: whoever the future wakes reads them.
            job.finished_at = time.monotonic()
            self.queue.record_run(job.finished_at - job.started_at)
        self._settle(job, result, error)

    def _run_batch(self, jobs: list[Job]) -> None:
        """Jobs of one batch key, in one device call (each settled on its own)."""
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.monotonic()
        for job in live:
            job.started_at = started   # running now (cancel answers "running")
        if len(live) > 1:
            self.batched_requests += len(live)
        self._current = (f"{live[0].label} (a batch of {len(live)})", started, live[0].budget_s)
        try:
            outcomes = live[0].fn.run_batch([job.fn for job in live])
        except BaseException as exc:  # a fault of the batch itself: each job gets its own copy of it
            log.exception("device thread: a batch of %d jobs failed", len(live))
            outcomes = [(None, RuntimeError(f"the batch failed: {exc!r}")) for _ in live]
        finally:
            self._current = None
            finished = time.monotonic()
        for job, (result, error) in zip(live, outcomes):
            job.finished_at = finished
            self.queue.record_run((finished - started) / len(live))
            self._settle(job, result, error)

    def _settle(self, job: Job, result: Any, error: BaseException | None) -> None:
        if error is not None:
            job.future.set_exception(error)
        else:
            # Counted before the next job is taken, so a client whose answers
            # pile up waits now, not once the event loop has seen them (a
            # result too intricate to size here counts once its answer is made).
            job.result_size = payload_bytes(result)   # sized once: the answer is made by it too
            self.queue.job_done(job, job.result_size or 0)
            job.future.set_result(result)

    def _run_guarded(self, label: str, budget_s: float, fn: Callable[[], Any]) -> None:
        self._current = (label, time.monotonic(), budget_s)
        try:
            fn()
        except Exception:
            log.exception("device thread: %s failed", label)
        finally:
            self._current = None


class DeviceRuntime:
    """The VDevice: open, identity, temperature and thermal state, runtime
    faults and the rebuild after them. Device thread only, except the plain
    attributes the event loop reads (see the module docstring) and
    :meth:`thermal_refusal`, which only reads them."""

    def __init__(self, backend: Backend, settings: Settings, placement: CpuPlacement | None = None):
        self.backend = backend
        self.settings = settings
        # The device thread's CPU: widened while HailoRT makes its threads (open, loads).
        self.placement = placement if placement is not None else CpuPlacement()
        self.vdevice: Any = None
        self.identity = DeviceIdentity(None, None, None)
        self.temperature_c: float | None = None
        self.temperature_read_at: float | None = None   # Unix time of the last reading
        self.throttled = False
        self.broken_reason: str | None = None
        self.runtime_faults = 0       # runtime faults seen (device lost, context broken)
        self.runtime_recoveries = 0   # VDevice rebuilds that succeeded after one
        self._last_attempt = float("-inf")
        self._temperature_mono = float("-inf")
        # While recovering from a runtime fault: the fault, attempts made, next attempt.
        self._fault: str | None = None
        self._rebuild_attempts = 0
        self._rebuild_at: float | None = None
        self._recovered_at: float | None = None
        self.on_close: list[Callable[[], None]] = []  # release model objects first
        self.on_open: list[Callable[[], None]] = []   # after every successful open
        self.loan_path: str | None = None             # where a loan survives a restart
        self.loan: lending.Loan | None = None         # the device is lent (read by the event loop)

    @property
    def platform(self):
        return self.backend.platform

    # Read from the running configuration at each use (settings.py).
    @property
    def device_config(self):
        return self.settings.config.device       # retry_s, rebuild_* (restart to change)

    @property
    def budgets(self):
        return self.settings.config.watchdog     # the watchdog's budgets

    @property
    def thermal(self):
        return self.settings.config.thermal      # the thermal guard's limits

    # -- opening ------------------------------------------------------------

    def open(self) -> bool:
        """Open the VDevice; False (reason in ``broken_reason``) if it cannot be."""
        self._last_attempt = time.monotonic()
        try:
            with self.placement.widened():
                self.vdevice = self.backend.open_vdevice()
        except BackendUnavailable as exc:
            self.broken_reason = str(exc)
            log.error("device unavailable: %s", exc)
            return False
        self.broken_reason = None
        self.identity = self.backend.identify(self.vdevice)
        self.refresh_temperature()
        log.info("device open: %s %s firmware %s (backend %s)", self.identity.architecture,
                 self.identity.device_id, self.identity.fw_version, self.backend.name)
        for hook in self.on_open:
            hook()
        return True

    def require(self) -> Any:
        """The open VDevice. A lost one is rebuilt on the backoff schedule
        after a runtime fault, otherwise reopened at most every ``retry_s``;
        a lent one is not touched."""
        if self.loan is not None:
            raise lending.lent_error(self.loan)
        if self.vdevice is None:
            if self._rebuild_at is not None:
                if time.monotonic() >= self._rebuild_at:
                    self.rebuild()
            elif time.monotonic() - self._last_attempt >= self.device_config.retry_s:
                self.open()
        if self.vdevice is None:
            retry_ms = None
            if self._rebuild_at is not None:
                retry_ms = max(int((self._rebuild_at - time.monotonic()) * 1000), 1)
            raise RequestError(DEVICE_UNAVAILABLE, f"Device unavailable: {self.broken_reason}",
                               retry_after_ms=retry_ms)
        return self.vdevice

    # -- lending ------------------------------------------------------------

    def lend(self, loan: lending.Loan) -> None:
        """Release every model and the VDevice for ``loan.to`` (device thread)."""
        self.close()
        self.loan = loan
        self._rebuild_at = None   # nothing reopens it while lent
        lending.save(self.loan_path, loan)
        log.warning("device lent to %s: every model and the device released", loan.to)

    def reclaim(self) -> bool | None:
        """End the loan and reopen the device (device thread). None: it was not
        lent; False: still held (reopened on the next request, every ``retry_s``)."""
        if self.loan is None:
            return None
        loan, self.loan = self.loan, None
        lending.save(self.loan_path, None)
        opened = self.open()
        log.info("device reclaimed from %s%s", loan.to, "" if opened else
                 f"; it cannot be opened yet ({self.broken_reason}), retried on demand")
        return opened

    # -- runtime faults -----------------------------------------------------

    def mark_broken(self, reason: str) -> None:
        """A runtime fault: drop every model and the VDevice, then rebuild
        (first attempt at the device thread's next chance)."""
        log.error("device runtime broken: %s", reason)
        self.runtime_faults += 1
        self.close()
        self._fault = reason
        now = time.monotonic()
        if self._recovered_at is None or now - self._recovered_at >= STABLE_AFTER_S:
            self._rebuild_attempts = 0  # a new series; else it goes on
        made, limit = self._rebuild_attempts, self.device_config.rebuild_attempts
        if made >= limit:
            self._rebuild_at = None
            self.broken_reason = (f"runtime fault: {reason}; not rebuilding on its own (device.rebuild_attempts "
                                  f"{limit} used up); retrying when a request comes")
            return
        self._rebuild_at = now + (self._backoff(made) if made else 0.0)
        self.broken_reason = f"runtime fault: {reason}; rebuilding the device"

    def _backoff(self, attempts_made: int) -> float:
        return min(self.device_config.rebuild_backoff_s * 2 ** (attempts_made - 1),
                   self.device_config.rebuild_backoff_max_s)

    def rebuild_due(self) -> float | None:
        return self._rebuild_at

    def rebuild(self) -> None:
        """One rebuild attempt; on failure the next is scheduled, or we give up."""
        self._rebuild_at = None
        if self.vdevice is not None:
            return
        self._rebuild_attempts += 1
        attempt, limit = self._rebuild_attempts, self.device_config.rebuild_attempts
        if self.open():
            self.runtime_recoveries += 1
            self._recovered_at = time.monotonic()
            log.info("device rebuilt after the runtime fault (%s), attempt %d of %d",
                     self._fault, attempt, limit)
            self._fault = None
            return
        failure = self.broken_reason
        if attempt >= limit:
            self.broken_reason = (f"runtime fault: {self._fault}; rebuilding failed {attempt} times "
                                  f"(last: {failure}); retrying when a request comes, "
                                  f"at most every {self.device_config.retry_s:g} s")
            log.error("giving up rebuilding the device after %d attempts: %s", attempt, failure)
            return
        wait = self._backoff(attempt)
        self._rebuild_at = time.monotonic() + wait
        self.broken_reason = (f"runtime fault: {self._fault}; rebuild attempt {attempt} of {limit} "
                              f"failed ({failure}), next in {wait:g} s")
        log.warning("device rebuild attempt %d of %d failed: %s; next in %g s", attempt, limit, failure, wait)

    # -- temperature and the thermal guard ----------------------------------

    def temperature_due(self) -> float | None:
        if self.vdevice is None:
            return None
        return self._temperature_mono + self.thermal.interval_s

    def refresh_temperature(self) -> None:
        self._temperature_mono = time.monotonic()
        if self.vdevice is None:
            return
        celsius = self.backend.temperature(self.vdevice)
        self.temperature_c = celsius
        self.temperature_read_at = time.time()
        self._update_throttle(celsius)

    def _update_throttle(self, celsius: float | None) -> None:
        """Hysteresis: throttle at limit_c, resume below resume_c. An
        unreadable sensor lifts the throttle (the chip protects itself)."""
        limits = self.thermal
        if celsius is None:
            if self.throttled:
                log.warning("chip temperature unreadable: accepting device work again")
            self.throttled = False
        elif not self.throttled and celsius >= limits.limit_c:
            self.throttled = True
            log.warning("chip at %.1f °C, at or above thermal.limit_c %g: refusing new device work "
                        "until it is below %g °C", celsius, limits.limit_c, limits.resume_c)
        elif self.throttled and celsius < limits.resume_c:
            self.throttled = False
            log.info("chip cooled to %.1f °C, below thermal.resume_c %g: accepting device work again",
                     celsius, limits.resume_c)

    def thermal_refusal(self) -> RequestError | None:
        """The ``overheated`` error while throttled, else None (any thread)."""
        if not self.throttled:
            return None
        limits, celsius = self.thermal, self.temperature_c
        shown = f"{celsius:.1f} °C" if celsius is not None else "an unknown temperature"
        return RequestError(
            OVERHEATED, f"Device overheated: chip at {shown} (limit {limits.limit_c:g} °C); new work "
                        f"is refused until it is below {limits.resume_c:g} °C",
            # The state can change at the next reading, not before.
            retry_after_ms=max(int(limits.interval_s * 1000), 1000))

    # -- closing ------------------------------------------------------------

    def close(self) -> None:
        for release in self.on_close:
            release()
        if self.vdevice is not None:
            vdevice, self.vdevice = self.vdevice, None
            self.backend.close_vdevice(vdevice)
            log.info("device released")
