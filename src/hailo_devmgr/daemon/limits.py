"""Bounds on what clients make the daemon hold, in all and per uid.

A :class:`Pool` counts one resource (request bytes in memory, descriptors
received with requests) that connections take while they read a request and
give back when it has been answered. It is bounded twice: for all clients
together and for each uid, so one member of group ``hailo`` (however many
connections or processes it opens) can take at most its own share and never
lock the others out. A taker may wait for room, but only until a deadline:
nothing in the request path waits forever.

Event loop only; ``give`` is synchronous so it is safe in any ``finally``.
"""
from __future__ import annotations

import asyncio
import collections


class Pool:
    def __init__(self, name: str, limit: int = 0, per_uid: int = 0):
        self.name = name
        self.limit = limit
        self.per_uid = min(per_uid, limit)
        self.used = 0
        self.by_uid: dict = {}   # uid -> amount held (no entry: none)
        self._waiters: list[asyncio.Future] = []

    def set_limits(self, limit: int, per_uid: int) -> None:
        self.limit, self.per_uid = limit, min(per_uid, limit)
        self._wake()

    def refusal(self, uid, amount: int, own: int = 0) -> str | None:
        """Why ``amount`` cannot be taken now for ``uid`` (None: it can).

        Within its uid's share, a lone taker may always take: one that holds,
        as ``own``, all its uid holds (so one request larger than the share
        still goes through, however many steps it takes in). The bound for
        all is never passed, but by a taker when nothing at all is held."""
        mine = self.by_uid.get(uid, 0)
        if mine > own and mine + amount > self.per_uid:
            return f"uid {uid} already holds {mine} of its {self.per_uid} {self.name}"
        if self.used + amount <= self.limit:
            return None   # what counts for all is at most what is used: no need to add up the shares
        shared = self._within_shares()
        if shared and shared + amount > self.limit:
            return f"the daemon holds {shared} of its {self.limit} {self.name}"
        return None

    def _within_shares(self) -> int:
        """What counts against the bound for all: each uid's holding up to its
        share. What a uid holds past it (answers it does not read, charged
        anyway) stops that uid alone, never the others."""
        return sum(min(held, self.per_uid) for held in self.by_uid.values())

    def take_now(self, uid, amount: int, own: int = 0) -> str | None:
        """Take ``amount`` if there is room; else the reason, and nothing taken."""
        reason = self.refusal(uid, amount, own)
        if reason is None:
            self.used += amount
            self.by_uid[uid] = self.by_uid.get(uid, 0) + amount
        return reason

    def charge(self, uid, amount: int) -> None:
        """Count ``amount`` that is held already (an answer made, waiting to be
        written), even past the bounds: what the uid then sends waits."""
        self.used += amount
        self.by_uid[uid] = self.by_uid.get(uid, 0) + amount

    async def take(self, uid, amount: int, deadline: float, own: int = 0) -> None:
        """Take ``amount``, waiting for room until ``deadline`` (loop time);
        past it, :class:`PoolTimeout` with the reason. ``own``: what the taker
        holds already (see :meth:`refusal`)."""
        loop = asyncio.get_running_loop()
        while (reason := self.take_now(uid, amount, own)) is not None:
            left = deadline - loop.time()
            if left <= 0:
                raise PoolTimeout(reason)
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses
                # a cancellation that comes as the waiter is woken.
                async with asyncio.timeout(left):
                    await waiter
            except TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def give(self, uid, amount: int) -> None:
        if not amount:
            return
        self.used -= amount
        left = self.by_uid.get(uid, 0) - amount
        if left > 0:
            self.by_uid[uid] = left
        else:
            self.by_uid.pop(uid, None)
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class PoolTimeout(Exception):
    """No room in a :class:`Pool` before the deadline."""

    @property
    def reason(self) -> str:
        return self.args[0]


class Turns:
    """Each uid's share of one pass of the event loop: ``per_pass`` units,
    however many connections the uid opens. A request that finds its uid's
    share of this pass used waits for a later pass.

    For the work the event loop does itself to answer a request: without
    this, a uid with 40 connections gets 40 answers made for every one
    another uid gets, and each pass of the loop grows with them. A uid may
    always take its first turn of a pass, whatever it costs; a client that
    waits for each answer never waits here, nor do a few clients of one
    uid with a request each. Within a uid, the waiting requests of its
    connections go in turn, each connection's in the order it sent them (a
    cancel after the request it names): one connection's backlog does not
    hold up the uid's other connections."""

    def __init__(self, per_pass: int = 8):
        self.per_pass = per_pass
        self._used: dict = {}      # uid -> units taken in this pass
        # uid -> {connection: deque of (future, cost)}; the dict's order is the turn order.
        self._waiting: dict = {}
        # uid -> waiters woken whose tasks have not run yet: until they do, no
        # newcomer of the uid goes at once (it would overtake them).
        self._resuming: dict = {}
        self._pass_scheduled = False

    def take_now(self, uid, cost: int = 1) -> bool:
        """Take ``cost`` units of the uid's share of this pass; False (nothing
        taken) when they must wait (:meth:`wait`)."""
        used = self._used.get(uid, 0)
        if uid in self._waiting or uid in self._resuming or (used and used + cost > self.per_pass):
            return False
        self._used[uid] = used + cost
        self._next_pass_soon()
        return True

    def take(self, uid, cost: int = 1, connection=None):
        """None when ``cost`` units are taken now; else the awaitable of
        :meth:`wait` (no coroutine is made for the usual case)."""
        if self.take_now(uid, cost):
            return None
        return self.wait(uid, cost, connection)

    async def wait(self, uid, cost: int = 1, connection=None) -> None:
        """Wait for a pass with room for ``cost`` units, in ``connection``'s turn
        among the uid's connections, after its earlier waiters."""
        waiter = asyncio.get_running_loop().create_future()
        queues = self._waiting.setdefault(uid, {})
        queue = queues.get(connection)
        if queue is None:
            # A connection that starts waiting goes first: the others had their turns.
            queue = collections.deque()
            others = list(queues.items())
            queues.clear()
            queues[connection] = queue
            queues.update(others)
        entry = (waiter, cost)
        queue.append(entry)
        self._next_pass_soon()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._resumed(uid)   # woken, then cancelled before it ran
            if entry in queue:
                queue.remove(entry)
            if not queue and queues.get(connection) is queue:
                del queues[connection]
            if not queues and self._waiting.get(uid) is queues:
                del self._waiting[uid]
            raise
        self._resumed(uid)

    def _resumed(self, uid) -> None:
        left = self._resuming[uid] - 1
        if left:
            self._resuming[uid] = left
        else:
            del self._resuming[uid]

    def _next_pass_soon(self) -> None:
        if not self._pass_scheduled:
            self._pass_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_pass)

    def _next_pass(self) -> None:
        """A new pass: every uid's share is whole again, and each uid's waiters
        take theirs now (at least one, whatever it costs)."""
        self._pass_scheduled = False
        self._used.clear()
        for uid in list(self._waiting):
            queues = self._waiting[uid]
            used = self._grant(uid, queues)
            if used:
                self._used[uid] = used
            if not queues:
                del self._waiting[uid]
        if self._used:
            self._next_pass_soon()

    def _grant(self, uid, queues: dict) -> int:
        """Wake one uid's waiters while its share lasts: the connections in
        turn, the oldest waiter of each; a connection served, or refused for
        want of share, goes to the back of the turn."""
        used = 0
        while queues:
            connection = next(iter(queues))
            queue = queues.pop(connection)
            while queue and queue[0][0].done():   # cancelled meanwhile
                queue.popleft()
            if not queue:
                continue
            waiter, cost = queue[0]
            if used and used + cost > self.per_pass:
                queues[connection] = queue
                return used
            queue.popleft()
            waiter.set_result(None)
            self._resuming[uid] = self._resuming.get(uid, 0) + 1
            used += cost
            if queue:
                queues[connection] = queue
        return used
