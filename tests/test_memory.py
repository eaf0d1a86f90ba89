"""What ended connections leave behind is freed even when the daemon goes quiet."""
from __future__ import annotations

import asyncio
import gc
import re
import socket
import struct
import time
import weakref

from hailo_devmgr.daemon.memory import CollectAfterConnections


class _Cycle:
    """Like a session and its stream: objects that refer to one another, holding a body."""

    def __init__(self):
        self.itself = self
        self.body = bytearray(1 << 20)


def test_cyclic_garbage_is_collected_once_soon_after_connections_end():
    starts = []

    def record(phase, info):
        if phase == "start":
            starts.append(info["generation"])

    async def connections_end():
        collector = CollectAfterConnections(delay_s=0.05)
        cycle = _Cycle()
        freed = weakref.ref(cycle)
        del cycle
        for _ in range(5):   # ending together: one collection for all of them
            collector.connection_ended()
        await asyncio.sleep(0.3)
        return freed

    gc.disable()   # as in a quiet daemon: nothing allocates, nothing collects by itself
    gc.callbacks.append(record)
    try:
        freed = asyncio.run(connections_end())
    finally:
        gc.callbacks.remove(record)
        gc.enable()
    assert freed() is None
    assert starts == [2]


def test_connections_ending_now_and_then_get_one_collection_per_spacing():
    """Ends that keep coming, each after the quiet delay, would each get a
    full collection (a pause of the event loop that grows with what other
    clients hold): they get one per ``spacing_s``, and one after the last."""
    starts = []

    def record(phase, info):
        if phase == "start":
            starts.append(time.monotonic())

    async def trickle(seconds: float):
        collector = CollectAfterConnections(delay_s=0.02, spacing_s=0.5)
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            collector.connection_ended()
            await asyncio.sleep(0.05)
        ended = time.monotonic()
        deadline = ended + 10
        while not any(t >= ended for t in starts) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)   # and no other one after it
        return ended

    gc.disable()
    gc.callbacks.append(record)
    try:
        ended = asyncio.run(trickle(1.2))
    finally:
        gc.callbacks.remove(record)
        gc.enable()
    during = [t for t in starts if t < ended]
    assert 1 <= len(during) <= 3          # not one per end (24 of them): one per 0.5 s at most
    assert all(b - a >= 0.45 for a, b in zip(starts, starts[1:]))
    assert len(starts) - len(during) == 1


def test_the_daemon_collects_what_refused_connections_left(start_daemon):
    """Hostile connections (bad JSON, then gone) leave sessions in reference
    cycles; a second after they end, the daemon collects them."""
    daemon = start_daemon()
    for _ in range(20):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(daemon.socket_path)
            body = b'{"action": "infer", "input_data": [' + b"1," * 1000
            sock.sendall(struct.pack(">I", len(body)) + body)
            assert sock.recv(65536)   # its bad_request answer
    deadline = time.monotonic() + 10
    while not (found := re.search(r"collected (\d+) objects of ended connections", daemon.log())):
        assert time.monotonic() < deadline, daemon.log()[-2000:]
        time.sleep(0.1)
    assert int(found.group(1)) > 0
