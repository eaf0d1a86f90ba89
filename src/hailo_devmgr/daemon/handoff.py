"""Calls from the device thread onto the event loop, batched.

``loop.call_soon_threadsafe`` writes to the loop's self-pipe on every call:
a system call on the device thread and a wake-up of the loop per finished
job. A :class:`LoopHandoff` makes one such call per *batch*: the first
call of a batch schedules the loop's drain, the ones that come before the
drain runs join it. Under load (the device finishing jobs faster than the
loop takes their answers) several answers cost one wake-up.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)


class LoopHandoff:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._calls: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False   # a drain is on its way to the loop

    def call(self, fn: Callable[..., Any], *args) -> None:
        """Run ``fn(*args)`` on the loop soon; from any thread."""
        with self._lock:
            self._calls.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            pass  # the loop is closed: the daemon is ending

    def _drain(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, collections.deque()
            self._scheduled = False
        for fn, args in calls:
            try:
                fn(*args)
            except Exception:   # one failing call must not lose the others
                log.exception("a call handed to the event loop failed")
