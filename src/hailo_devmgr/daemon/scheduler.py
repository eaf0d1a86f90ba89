"""The device queue: which waiting job the device thread runs next.

The device cannot be pre-empted mid-inference, so the only lever is the
order of what waits. :class:`FairScheduler` (the default) picks, in turn:

1. **Priority class** (``interactive`` < ``normal`` < ``batch``), after
   **aging**: a job moves up one class for every ``aging_s`` it has waited,
   so a ``batch`` job waits at most about 2 x ``aging_s`` before it competes
   as ``interactive``; nothing starves.
2. **Round robin across clients** within that class: the client served
   longest ago goes first, so one client with 100 queued jobs delays
   another by one job, not 100. A client is a uid (``Job.client`` is the
   connection's ``client_key``), so more connections or processes buy no
   extra share.
3. Its oldest job in that class, unless **model affinity** applies: when
   that job's model is not loaded and another job of the same class is for
   a loaded model, the latter runs first. A job can be passed over this way
   at most ``affinity_max_skips`` times, which bounds the unfairness.

Admission (both policies): a client may hold at most ``max_queue_per_client``
waiting jobs, and the queue ``max_queue``. A full queue does not belong to
whoever filled it first: a client holding less than its **fair share**
(``max_queue`` divided by the number of clients with jobs waiting, itself
counted) is admitted by **displacing** one job of the client holding the
most, which is answered ``busy`` as if it had been refused. Counts ignore
priority, so a higher class buys no larger share. The displaced client
keeps at least the share (it held more than the newcomer will), so two
clients never take turns displacing each other, and no set of other
clients can keep one out of the queue (below ``max_queue`` clients).

A client's results count against it from the moment the device thread
makes them until their answers are written (``job_done``, ``answer_made``,
``unread``); past ``max_untaken_bytes`` (the uid's share of request bytes)
its waiting jobs do not start, so a client that does not read its answers
cannot have the device make more of them.

Batches: after ``get``, the device thread may ``take_along`` the jobs
that would be taken next anyway, while they share the first one's
``batch_key`` (one model; device.py runs them in one device call). The
order is the one ``get`` alone would give, so a batch changes how jobs run,
never which runs when.

Jobs whose deadline passed before they started are answered ``timeout`` and
never run. :class:`FifoQueue` keeps the core's first-come order (config
``scheduling.policy: fifo``), for comparison in benchmarks.

Locking: every field is guarded by ``_lock`` (one lock); ``put``, ``remove``,
``drop_owner``, ``answer_made`` and ``unread`` come from the event loop,
``get``, ``take_along`` and ``job_done`` from the device thread,
which sleeps on ``_wakeup`` (a C queue: one token when it sleeps and a job
comes; no Python-level condition variable on the request path).
Jobs are settled outside our lock (a JobFuture has its own, jobs.py).
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from .jobs import PRIORITIES, Job
from ..wire.protocol import BUSY, CANCELLED, TIMEOUT, RequestError, shutting_down

_EWMA_WEIGHT = 0.2
MAX_REMEMBERED_CLIENTS = 1024


@dataclass(frozen=True)
class QueueLimits:
    max_queue: int = 256
    max_queue_per_client: int = 128
    aging_s: float = 10.0
    affinity_max_skips: int = 4
    # Bytes of results and answers a client has not taken yet (the uid's
    # share of request bytes): past it, its waiting jobs do not start.
    max_untaken_bytes: int = 1 << 62


class JobQueue:
    """Storage, limits, cancellation and statistics; subclasses choose the order."""

    def __init__(self, limits: QueueLimits = QueueLimits(),
                 loaded_keys: Callable[[], frozenset] = frozenset):
        self.limits = limits
        self._loaded_keys = loaded_keys
        self._jobs: list[Job] = []
        self._lock = threading.Lock()
        self._wakeup: queue.SimpleQueue = queue.SimpleQueue()
        self._sleeping = False   # the device thread waits (or is about to) on _wakeup
        self._unanswered: dict = {}   # client -> bytes of results made, answers not yet made
        self._unread: dict = {}       # client -> bytes of answers made, not yet written
        self._over: set = set()       # clients past max_untaken_bytes: their jobs do not start
        self._closed = False
        self._run_s = 0.05  # moving average of a job's run time, for retry_after_ms

    # -- event loop side ----------------------------------------------------

    def put(self, job: Job, *, wake: bool = True) -> None:
        """Queue ``job``; ``wake=False`` leaves a sleeping device thread asleep
        until :meth:`wake` (several jobs, one wake-up)."""
        with self._lock:
            if self._closed:
                raise shutting_down()
            displaced = self._admit(job)
            if displaced is not None:
                self._jobs.remove(displaced)
                refusal = self._displaced_error(displaced)
            self._jobs.append(job)
        if wake:
            self.wake()
        if displaced is not None:
            displaced.future.set_exception(refusal)  # answered as a refused request is

    # -- results a client has not taken yet -----------------------------------
    #
    # A client's results count from the moment the device thread makes them
    # (job_done) until its answers are made (answer_made), then, for what
    # its socket does not take at once, until written (unread). Past
    # max_untaken_bytes its waiting jobs do not start: checked on the device
    # thread before it takes another job, since the event loop may see the
    # results, and the answers a client does not read, only after many more.

    def job_done(self, job: Job, result_bytes: int) -> None:
        """The device thread made ``job``'s result (device thread)."""
        with self._lock:
            if job.answered or not result_bytes:
                return   # its request is gone already: nothing would give it back
            job.result_bytes = result_bytes
            self._unanswered[job.client] = self._unanswered.get(job.client, 0) + result_bytes
            self._recount(job.client)

    def answer_made(self, job: Job) -> None:
        """``job``'s answer is made, or its request is gone (event loop)."""
        with self._lock:
            job.answered = True
            size, job.result_bytes = job.result_bytes, 0
            released = size and self._add(self._unanswered, job.client, -size)
        if released:
            self.wake()

    def unread(self, client: Hashable, delta: int) -> None:
        """Bytes of ``client``'s answers waiting to be written: more (their
        socket did not take them) or fewer (written, or their connection
        closed) (event loop; admission.py)."""
        with self._lock:
            released = self._add(self._unread, client, delta)
        if released:
            self.wake()

    def _add(self, counts: dict, client: Hashable, delta: int) -> bool:
        """Under the lock; True when ``client`` may run jobs again."""
        left = counts.get(client, 0) + delta
        if left > 0:
            counts[client] = left
        else:
            counts.pop(client, None)
        return self._recount(client)

    def _recount(self, client: Hashable) -> bool:
        """Under the lock: whether ``client`` is past its bound now; True
        when it just came back under it."""
        untaken = self._unanswered.get(client, 0) + self._unread.get(client, 0)
        if untaken > self.limits.max_untaken_bytes:
            self._over.add(client)
            return False
        if client in self._over:
            self._over.discard(client)
            return True
        return False

    def set_limits(self, limits: QueueLimits) -> None:
        """A reloaded configuration's bounds (the policy itself needs a restart)."""
        with self._lock:
            self.limits = limits
            released = [client for client in list(self._over) if self._recount(client)]
        if released:
            self.wake()

    def wake(self) -> None:
        """Wake the device thread if it sleeps (or is about to)."""
        with self._lock:
            wake, self._sleeping = self._sleeping, False
        if wake:
            self._wakeup.put(None)

    def _admit(self, job: Job) -> Job | None:
        """Raise ``busy`` if ``job`` may not enter; else the job it displaces, if any."""
        mine = sum(1 for queued in self._jobs if queued.client == job.client) if self._jobs else 0
        if mine >= self.limits.max_queue_per_client:
            raise self._busy(mine, f"this client already has {mine} requests queued (the limit)")
        if len(self._jobs) < self.limits.max_queue:
            return None
        counts = Counter(queued.client for queued in self._jobs)
        share = self._fair_share(counts, job.client)
        if mine >= share:
            raise self._busy(len(self._jobs), f"the device queue is full ({self.limits.max_queue} requests)")
        # mine < share and the queue is full, so some other client holds more than
        # the share: it still holds at least the share after losing one job.
        return self._displaceable(counts)

    def _fair_share(self, counts: Counter, client: Hashable) -> int:
        holders = len(counts) + (client not in counts)
        return self.limits.max_queue // holders

    def _displaceable(self, counts: Counter) -> Job:
        """The heaviest client's least urgent, newest job: losing it costs that
        client least. Among equally heavy clients, the one that queued last."""
        newest = {}
        for queued in self._jobs:
            newest[queued.client] = max(newest.get(queued.client, queued.enqueued_at), queued.enqueued_at)
        heaviest = max(counts, key=lambda client: (counts[client], newest[client]))
        return max((queued for queued in self._jobs if queued.client == heaviest),
                   key=lambda queued: (queued.priority, queued.enqueued_at))

    def _displaced_error(self, job: Job) -> RequestError:
        left = sum(1 for queued in self._jobs if queued.client == job.client)
        return self._busy(left, "the device queue is full and this client held more than its fair share "
                                "of it; this request made room for another client's")

    def _busy(self, ahead: int, what: str) -> RequestError:
        retry_ms = max(1, int(ahead * self._run_s * 1000))
        return RequestError(BUSY, f"Busy: {what}; retry in about {retry_ms} ms", retry_after_ms=retry_ms)

    def remove(self, job: Job, error: RequestError) -> bool:
        """Take a job out before it starts and answer it with ``error``.
        False when it is no longer waiting (running or done)."""
        with self._lock:
            if job not in self._jobs:
                return False
            self._jobs.remove(job)
        job.future.set_exception(error)
        return True

    def find(self, owner: Hashable, request_id: Any) -> Job | None:
        with self._lock:
            return next((job for job in self._jobs
                         if job.owner == owner and job.request_id == request_id), None)

    def drop_owner(self, owner: Hashable) -> int:
        """A connection went away: its waiting jobs never run, nobody is answered."""
        with self._lock:
            dropped = [job for job in self._jobs if job.owner == owner]
            self._jobs = [job for job in self._jobs if job.owner != owner]
        for job in dropped:
            job.future.cancel()
        return len(dropped)

    def close(self) -> list[Job]:
        """Refuse new jobs; return the ones still waiting."""
        with self._lock:
            self._closed = True
            waiting, self._jobs = self._jobs, []
        self._wakeup.put(None)
        return waiting

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._jobs)

    def depth_by_class(self) -> dict[str, int]:
        with self._lock:
            counts = Counter(PRIORITIES[job.priority] for job in self._jobs)
        return {name: counts.get(name, 0) for name in PRIORITIES}

    def depth_by_client(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(str(job.client) for job in self._jobs))

    # -- device thread ------------------------------------------------------

    def get(self, timeout: float) -> Job | None:
        """The next job to run, or None after ``timeout`` (or once closed and empty)."""
        expired: list[Job] = []
        deadline = time.monotonic() + timeout
        job = None
        while True:
            with self._lock:
                now = time.monotonic()
                expired += self._take_expired(now)
                self._sleeping = False   # awake (a token left by a late put only costs one more look)
                runnable = self._runnable()
                if runnable:
                    job = self._take(*self._choose(runnable, now))
                    break
                left = deadline - now
                if self._closed or left <= 0:
                    break
                self._sleeping = True
            try:
                self._wakeup.get(timeout=left)
            except queue.Empty:
                pass
        for late in expired:
            late.future.set_exception(RequestError(TIMEOUT, "Timed out before the device could start it"))
        return job

    def take_along(self, first: Job, most: int) -> list[Job]:
        """Up to ``most`` jobs that share ``first``'s ``batch_key`` and would be
        taken right after it, in that order: they run with it in one device
        call (device thread). The order stays the one ``get`` would give."""
        taken: list[Job] = []
        with self._lock:
            now = time.monotonic()
            while len(taken) < most:
                runnable = self._runnable()
                if not runnable:
                    break
                pick, passed_over = self._choose(runnable, now)
                if pick.batch_key != first.batch_key or pick.batch_key is None:
                    break
                taken.append(self._take(pick, passed_over))
        return taken

    def _take(self, pick: Job, passed_over: Job | None) -> Job:
        """Under the lock: ``pick`` leaves the queue to run."""
        self._chosen(pick, passed_over)
        self._jobs.remove(pick)
        return pick

    def record_run(self, seconds: float) -> None:
        self._run_s += _EWMA_WEIGHT * (seconds - self._run_s)

    def _take_expired(self, now: float) -> list[Job]:
        expired = [job for job in self._jobs if job.deadline is not None and job.deadline <= now]
        if expired:
            self._jobs = [job for job in self._jobs if job not in expired]
        return expired

    def _runnable(self) -> list[Job]:
        """The waiting jobs that may start (not those of clients past their bound)."""
        if not self._over:
            return self._jobs
        return [job for job in self._jobs if job.client not in self._over]

    def _choose(self, jobs: list[Job], now: float) -> tuple[Job, Job | None]:
        """Which of ``jobs`` (waiting, none of a client past its bound; never
        empty) runs next, and the job it is chosen over, if any (affinity);
        nothing changes until ``_chosen``."""
        raise NotImplementedError

    def _chosen(self, pick: Job, passed_over: Job | None) -> None:
        """``pick`` runs next: the policy's record of it."""


class FifoQueue(JobQueue):
    """First come, first served: the core's order, kept for comparison."""

    def _choose(self, jobs: list[Job], now: float) -> tuple[Job, Job | None]:
        return min(jobs, key=lambda job: job.enqueued_at), None


class FairScheduler(JobQueue):
    """Priority classes with aging, round robin across clients, bounded affinity."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._turns = itertools.count(1)
        self._last_turn: dict[Hashable, int] = {}  # client -> when it was last served

    def _choose(self, jobs: list[Job], now: float) -> tuple[Job, Job | None]:
        if len(jobs) == 1:
            return jobs[0], None   # nothing to choose (the usual case when the device keeps up)
        # One pass (the device thread runs this between every two jobs): the
        # best effective class, its jobs, and each client's oldest in it.
        best = None
        in_class: list[Job] = []
        oldest_of: dict[Hashable, Job] = {}
        aging_s = self.limits.aging_s
        for job in jobs:
            # Its class after aging: one class up per aging_s waited, down to 0
            # (inline: this runs for every waiting job between any two jobs).
            rank = job.priority - int((now - job.enqueued_at) // aging_s) if aging_s > 0 else job.priority
            if rank < 0:
                rank = 0
            if best is None or rank < best:
                best, in_class, oldest_of = rank, [], {}
            elif rank > best:
                continue
            in_class.append(job)
            known = oldest_of.get(job.client)
            if known is None or job.enqueued_at < known.enqueued_at:
                oldest_of[job.client] = job
        turn = self._last_turn.get
        client = min(oldest_of, key=lambda c: (turn(c, 0), oldest_of[c].enqueued_at))
        return self._with_affinity(oldest_of[client], in_class)

    def _chosen(self, pick: Job, passed_over: Job | None) -> None:
        if passed_over is not None:
            passed_over.skips += 1
        self._last_turn[pick.client] = next(self._turns)
        if len(self._last_turn) > MAX_REMEMBERED_CLIENTS:
            self._forget_idle_clients()

    def _forget_idle_clients(self) -> None:
        """Bound the per-client record: clients with nothing queued start afresh."""
        waiting = {job.client for job in self._jobs}
        self._last_turn = {client: turn for client, turn in self._last_turn.items() if client in waiting}

    def _with_affinity(self, pick: Job, in_class: list[Job]) -> tuple[Job, Job | None]:
        if pick.skips >= self.limits.affinity_max_skips or pick.model_key is None:
            return pick, None
        loaded = self._loaded_keys()
        if pick.model_key in loaded:
            return pick, None
        warm = min((job for job in in_class if job.model_key in loaded), key=lambda job: job.enqueued_at,
                   default=None)
        if warm is None:
            return pick, None
        return warm, pick


def create_queue(policy: str, limits: QueueLimits, loaded_keys: Callable[[], frozenset]) -> JobQueue:
    cls = FifoQueue if policy == "fifo" else FairScheduler
    return cls(limits, loaded_keys)


def cancelled_error() -> RequestError:
    return RequestError(CANCELLED, "Cancelled by the client")
