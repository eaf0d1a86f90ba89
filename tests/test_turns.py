"""limits.Turns: each uid's share of a pass of the event loop, however many connections it opens."""
from __future__ import annotations

import asyncio

import pytest

from hailo_devmgr.daemon import limits


class PassCounter:
    """Counts the event loop's passes (one step of its task per pass)."""

    def __init__(self):
        self.now = 0
        self._task = asyncio.ensure_future(self._tick())

    async def _tick(self):
        while True:
            await asyncio.sleep(0)
            self.now += 1

    def stop(self):
        self._task.cancel()


def run(coroutine):
    return asyncio.run(coroutine)


async def take(turns, uid, cost=1):
    if not turns.take_now(uid, cost):
        await turns.wait(uid, cost)


WHOLE = 8   # a status answer takes a whole pass's share


def test_a_uid_with_many_status_requests_gets_one_a_pass_and_another_uid_is_not_held_up():
    async def main():
        turns, passes, served = limits.Turns(WHOLE), PassCounter(), []

        async def ask(uid, tag):
            await take(turns, uid, WHOLE)
            served.append((tag, passes.now))

        await asyncio.gather(*(ask("flooder", f"f{i}") for i in range(5)), ask("victim", "v"))
        passes.stop()
        return served

    served = dict(run(main()))
    flooder = [served[f"f{i}"] for i in range(5)]
    assert flooder == sorted(flooder) and len(set(flooder)) == 5   # one a pass, in the order asked
    assert served["v"] == served["f0"]                              # the other uid went at once


def test_small_requests_share_a_pass_up_to_the_uids_share():
    async def main():
        turns, passes, served = limits.Turns(WHOLE), PassCounter(), []

        async def ask(tag):
            await take(turns, "uid")
            served.append((tag, passes.now))

        await asyncio.gather(*(ask(i) for i in range(WHOLE + 1)))
        passes.stop()
        return dict(served)

    served = run(main())
    assert len({served[i] for i in range(WHOLE)}) == 1   # eight clients' requests in one pass
    assert served[WHOLE] > served[0]                     # the ninth in the next


def test_a_client_that_waits_for_each_answer_never_waits_for_a_turn():
    async def main():
        turns, passes = limits.Turns(WHOLE), PassCounter()
        waited = []
        for _ in range(5):
            before = passes.now
            await take(turns, "poller", WHOLE)
            waited.append(passes.now - before)
            await asyncio.sleep(0)   # the answer goes out; the next request comes a pass later
            await asyncio.sleep(0)
        passes.stop()
        return waited

    assert run(main()) == [0, 0, 0, 0, 0]


def test_a_cancelled_waiter_gives_its_place_to_the_next():
    async def main():
        turns = limits.Turns(WHOLE)
        first, second, third = (asyncio.ensure_future(take(turns, "uid", WHOLE)) for _ in range(3))
        await asyncio.sleep(0)                       # the first takes this pass's turn, the others wait
        assert first.done() and not second.done() and not third.done()
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        await asyncio.wait_for(third, 1)
        return turns._waiting

    assert run(main()) == {}


def test_one_connections_backlog_does_not_hold_up_the_same_uids_other_connections():
    async def main():
        turns, passes, served = limits.Turns(WHOLE), PassCounter(), {}

        async def ask(connection, tag, cost=WHOLE):
            if not turns.take_now("uid", cost):
                await turns.wait("uid", cost, connection)
            served[tag] = passes.now

        backlog = [asyncio.ensure_future(ask("chatty", f"c{i}")) for i in range(6)]
        await asyncio.sleep(0)   # the chatty connection's backlog waits
        sibling = asyncio.ensure_future(ask("sibling", "s"))
        await asyncio.gather(*backlog, sibling)
        passes.stop()
        return served

    served = run(main())
    chatty = sorted(served[f"c{i}"] for i in range(6))
    assert served["s"] <= chatty[2]   # in turn with the backlog, not after all of it


def test_a_connections_requests_keep_their_order_so_a_cancel_finds_its_target():
    async def main():
        turns, order = limits.Turns(WHOLE), []

        async def ask(tag, cost=1):
            if not turns.take_now("uid", cost):
                await turns.wait("uid", cost, "connection")
            order.append(tag)

        await asyncio.gather(ask("status", WHOLE), ask("infer"), ask("cancel the infer"), ask("status 2", WHOLE))
        return order

    assert run(main()) == ["status", "infer", "cancel the infer", "status 2"]


def test_a_request_woken_for_its_turn_is_not_overtaken_before_it_runs():
    """A waiter is woken in one pass and runs in the next: a request of the
    same uid that comes in between (a cancel of the woken one) waits too."""
    async def main():
        turns, order = limits.Turns(WHOLE), []

        async def ask(tag, cost=1):
            waiting = turns.take("uid", cost, "connection")
            if waiting is not None:
                await waiting
            order.append(tag)

        await ask("status", WHOLE)                 # this pass's share is used
        infer = asyncio.ensure_future(ask("infer"))
        await asyncio.sleep(0)                     # the infer waits
        turns._next_pass()                         # a new pass wakes it; its task runs later
        cancel = asyncio.ensure_future(ask("cancel the infer"))
        await asyncio.gather(infer, cancel)
        return order, turns._resuming

    order, resuming = run(main())
    assert order == ["status", "infer", "cancel the infer"] and resuming == {}


def test_a_large_body_takes_a_pass_to_decode_and_a_small_one_its_requests_turn():
    from hailo_devmgr.daemon.admission import DECODE_UNIT_BYTES, Admission
    from hailo_devmgr.daemon.config import Config
    from hailo_devmgr.daemon.settings import Settings

    async def main():
        admission = Admission(Settings(Config()))
        assert admission.turn_to_decode("uid", DECODE_UNIT_BYTES, "c") is None   # small: no turn of its own
        assert admission.turn_to_decode("uid", 250_000, "c") is None             # the first of the pass goes
        waiting = admission.turn_to_decode("uid", 250_000, "c")                  # the second waits for the next
        assert waiting is not None
        await asyncio.wait_for(waiting, 1)

    run(main())
