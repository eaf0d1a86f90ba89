"""Admission: what each uid may hold while its requests are read, waited on
and answered, and who may ask for what.

The pools (limits.Pool) bound, per uid and in all, the request bytes and
descriptors held, the answers not yet taken, the registered shared memory
and the device jobs between submission and answer; the work of answering
takes turns per uid on the event loop (limits.Turns). Peer rules: admins
(root, the daemon's own user, config ``admin``) and the priority a client
gets from ``scheduling.client_priorities``. Event loop only.
"""
from __future__ import annotations

import asyncio
import logging
import os

from . import limits
from ..wire import protocol as p
from ..wire.protocol import RequestError
from .settings import Settings, bytes_per_uid

log = logging.getLogger(__name__)

UNBOUNDED = 1 << 62
# A uid's share of each pass of the event loop: a request costs one unit, an
# answer built from the daemon's whole state (status and the like, which grow
# with the connections and models they list) costs the whole share. Eight
# units: eight clients of one uid with a request each never wait.
TURN_UNITS_PER_PASS = 8
STATE_ANSWERS = frozenset({"ping", "status", "device_status", "metrics"})
# Decoding a JSON body larger than this takes a turn first, a unit per this many bytes.
DECODE_UNIT_BYTES = 16 * 1024
_DAEMON_UID = os.getuid()   # the daemon's own user is an admin (it never changes while it runs)


class Admission:
    def __init__(self, settings: Settings):
        self.settings = settings   # admin, client_priorities, frame_timeout_s: read at each use
        # What clients' requests hold while read and until answered, bounded in all and per uid.
        self.pending_bytes = limits.Pool("request bytes")
        self.pending_fds = limits.Pool("request descriptors")
        # Answers made and not yet taken by their client (also in pending_bytes):
        # past a uid's share, that uid gets no more device work run.
        self.unsent_answers = limits.Pool("bytes of unread answers")
        # Registered shared memory: per connection in shm_buffers.py; here per uid (the
        # daemon's page tables, and the RSS the kernel's OOM killer reads).
        self.registered_bytes = limits.Pool("registered shared-memory bytes")
        # Answers waiting to be written are also told to the device queue
        # (JobQueue.unread, set by the dispatcher), which holds the client's
        # jobs past its share; clients past it, for the log's sake.
        self.report_unread = lambda client, delta: None
        self._not_reading: set = set()
        # Per uid only: the queue's fair share rule (scheduler.py) governs all uids together.
        self.device_jobs = limits.Pool("device requests")
        # Each uid's share of a pass of the event loop (its answers' work there).
        self.turns = limits.Turns(TURN_UNITS_PER_PASS)
        self._set_bounds()
        settings.watch(self._set_bounds)

    def _set_bounds(self) -> None:
        """The pools' bounds, from the running configuration (what is held stays counted)."""
        config = self.settings.config
        self.pending_bytes.set_limits(config.max_pending_bytes, bytes_per_uid(config))
        self.pending_fds.set_limits(config.max_pending_fds, config.max_pending_fds_per_uid)
        self.unsent_answers.set_limits(UNBOUNDED, bytes_per_uid(config))
        # One uid may register what one connection may, all together four times that.
        self.registered_bytes.set_limits(4 * config.shm_buffer_max_bytes, config.shm_buffer_max_bytes)
        # Those waiting (the queue's own bound), one running and one being answered.
        self.device_jobs.set_limits(UNBOUNDED, config.scheduling.max_queue_per_client + 2)

    def held(self) -> dict:
        return {"request_bytes": self.pending_bytes.used, "descriptors": self.pending_fds.used,
                "registered_shm_bytes": self.registered_bytes.used}

    # -- peers ----------------------------------------------------------------

    def is_admin(self, peer) -> bool:
        """Root, the daemon's own user, and the uids/groups in config `admin`."""
        if peer.uid is None:
            return False
        admin = self.settings.config.admin
        if peer.uid in (0, _DAEMON_UID) or peer.uid in admin.uids:
            return True
        return bool(admin.groups) and bool(set(admin.groups) & peer.groups())

    def configured_priority(self, peer, unit: str | None) -> str | None:
        """The priority ``scheduling.client_priorities`` gives this peer, by uid or unit."""
        for rule in self.settings.config.scheduling.client_priorities:
            if rule.get("uid") == peer.uid or (unit is not None and rule.get("unit") == unit):
                return rule["priority"]
        return None

    # -- turns on the event loop ----------------------------------------------

    def turn(self, uid, action: str | None, connection=None):
        """None when a request of ``action`` (None: refused before its action
        was known) may be answered in this pass; else an awaitable that ends
        when its turn comes, in ``connection``'s turn among the uid's
        connections. A ``cancel`` waits too (cheap as it is, a flood of them
        took the loop like any other), after the request it names: a
        connection's requests keep the order they came in."""
        return self.turns.take(uid, TURN_UNITS_PER_PASS if action in STATE_ANSWERS else 1, connection)

    def turn_to_decode(self, uid, size: int, connection=None):
        """Like :meth:`turn`, for decoding a JSON body of ``size`` bytes: it
        holds the GIL throughout (about 12 ms for 250 KB of numbers), so it
        costs a unit per DECODE_UNIT_BYTES (a large body takes a pass alone).
        None at once for a body up to DECODE_UNIT_BYTES: its request's turn
        (:meth:`turn`) covers it."""
        if size <= DECODE_UNIT_BYTES:
            return None
        return self.turns.take(uid, size // DECODE_UNIT_BYTES, connection)

    # -- device work ----------------------------------------------------------

    def take_job_slot(self, uid) -> None:
        """A uid's device jobs from submission until their answer is made:
        queued, running, and done but not yet encoded. The queue's own bound
        counts only those waiting; with a fast device, a uid that never reads
        could otherwise have any number of answers made before one of them
        was counted against its share."""
        refusal = self.device_jobs.take_now(uid, 1)
        if refusal is not None:
            raise RequestError(p.BUSY, f"Too many device requests at once ({refusal})", retry_after_ms=100)

    def give_job_slot(self, uid) -> None:
        self.device_jobs.give(uid, 1)

    # -- answers not read -----------------------------------------------------

    def answer_waiting(self, uid, client, size: int) -> None:
        """An answer of ``size`` bytes waits to be written (its client does not
        read): it counts in the uid's request bytes and unread answers, and
        in what the device queue holds against the client (``report_unread``:
        past the uid's share its waiting jobs do not start)."""
        self.pending_bytes.charge(uid, size)
        self.unsent_answers.charge(uid, size)
        self.report_unread(client, size)
        if client not in self._not_reading and self.unsent_answers.refusal(uid, 0) is not None:
            self._not_reading.add(client)
            log.warning("%s does not read its answers: its queued device requests wait", client,
                        extra={"CLIENT_UID": uid})

    def answer_written(self, uid, client, size: int) -> None:
        """A waiting answer is written, or dropped with its connection."""
        self.pending_bytes.give(uid, size)
        self.unsent_answers.give(uid, size)
        self.report_unread(client, -size)
        if client in self._not_reading and self.unsent_answers.refusal(uid, 0) is None:
            self._not_reading.discard(client)
            log.info("%s reads its answers again: its device requests run", client, extra={"CLIENT_UID": uid})

    def answers_taken(self, uid):
        """None when the uid's answers are taken (the usual case: no coroutine
        is made for it); else an awaitable that waits while the uid holds more
        than its share of request bytes and unread answers: a client that asks
        and never reads gets no more of its work queued (its queued work is
        held: answer_waiting). Bounded like any wait: then busy."""
        if self.unsent_answers.refusal(uid, 0) is None:
            return None
        return self._wait_for_answers(uid)

    async def _wait_for_answers(self, uid) -> None:
        deadline = asyncio.get_running_loop().time() + self.settings.config.frame_timeout_s
        try:
            await self.unsent_answers.take(uid, 0, deadline)
        except limits.PoolTimeout as full:
            raise RequestError(p.BUSY, f"This client's answers are not being read ({full.reason})",
                               retry_after_ms=1000) from None

