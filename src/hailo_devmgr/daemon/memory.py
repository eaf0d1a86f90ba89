"""Memory the daemon is done with goes back: to the allocator, and from it
to the system.

Two things keep freed memory from coming back on their own:

- glibc's heap: blocks freed in the middle of it stay in the process
  (``return_large_blocks_to_the_system`` for large blocks; after a burst,
  ``give_free_heap_back`` for the free pages of the others);
- Python's cyclic garbage: a connection's session, its stream and reader
  refer to one another, and an exception's traceback holds the frames
  that hold the request it refused (a 4 MB body, for one). Such cycles are
  freed only by the cyclic collector, which runs when objects are
  *allocated*: after a burst of connections the daemon goes quiet, nothing
  is allocated, and the garbage of the last hundred connections, with the
  bodies they read, would stay (measured after the storm bench's 3,000
  hostile connections: 103 sessions and 6 refused requests uncollected,
  +5 to +21 MiB of RSS). ``CollectAfterConnections`` collects once
  connections have stopped ending for a second (at most once per 3 s).

``freeze_startup_objects`` moves what exists once the daemon is ready
(modules, configuration, the loaded backend) out of every later
collection, so that one scans only what requests made since: a fraction
of a millisecond when the daemon is quiet.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import math
import time

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3          # mallopt(3)
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 256 * 1024
# The event loop's and the worker threads' allocations share this many glibc
# arenas, not one per thread: a worker that decoded a large hostile body
# leaves no arena of its own half full (the storm bench's RSS after 3,000
# hostile connections: +14.6 MiB with 2, +15.3 and +21.9 MiB without).
MALLOC_ARENAS = 2
COLLECT_DELAY_S = 1.0
# Short enough that the garbage of a burst's last connections goes within
# seconds of its end, even when one collection ran just before the end
# (with 10 s, RSS 5 s after the storm bench's 3,000 hostile connections
# was +1.4 to +25.5 MiB, by whether a collection fell late in the storm).
COLLECT_SPACING_S = 3.0


def _glibc(name: str):
    """A function of glibc, or None (another C library): these are best effort."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


_MALLOPT = _glibc("mallopt")
_MALLOC_TRIM = _glibc("malloc_trim")


def return_large_blocks_to_the_system() -> None:
    """Blocks of 256 KiB and more (request bodies, attachments, answers) from
    mmap, so that freeing one gives its memory back at once. glibc otherwise
    raises that threshold each time such a block is freed, and later ones
    come from a heap it cannot give back: after a burst of large or hostile
    requests the daemon's RSS would stay up."""
    if _MALLOPT is None:
        log.debug("mallopt is not available: large blocks stay in the heap")
        return
    _MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    _MALLOPT(M_ARENA_MAX, MALLOC_ARENAS)


def give_free_heap_back() -> None:
    """Free pages inside glibc's heaps go back to the system (malloc_trim(0)):
    the blocks between 512 bytes and the mmap threshold that a burst of
    requests used come from there, and glibc on its own gives back only the
    top of a heap."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def freeze_startup_objects() -> None:
    """Leave what exists now out of every later cyclic collection (see above)."""
    gc.collect()   # what start-up left as garbage is not kept forever
    gc.freeze()


class CollectAfterConnections:
    """One cyclic collection once connections have stopped ending for
    ``delay_s``, and at most one per ``spacing_s`` (event loop only). While
    connections keep coming and going the daemon allocates, and Python's own
    collections run: this one is for the quiet after. A full collection
    takes longer the more other clients hold (up to 29 ms, measured with two
    uids each holding 60 connections of parked requests), so a client that
    ends a connection now and then gets one such pause per ``spacing_s``,
    not one per connection."""

    def __init__(self, delay_s: float = COLLECT_DELAY_S, spacing_s: float = COLLECT_SPACING_S):
        self.delay_s = delay_s
        self.spacing_s = spacing_s
        self._first: float | None = None   # loop time of the first end not collected yet
        self._last = 0.0                   # of the latest end
        self._previous = -math.inf         # of the latest collection
        self._timer: asyncio.TimerHandle | None = None

    def connection_ended(self) -> None:
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        if self._first is None:
            self._first = self._last
        if self._timer is None:
            self._timer = loop.call_at(self._due(), self._fire)

    def _due(self) -> float:
        quiet = min(self._last + self.delay_s, self._first + self.spacing_s)
        return max(quiet, self._previous + self.spacing_s)

    def _fire(self) -> None:
        # One timer, moved on rather than replaced at every end (as session.py's idle timer).
        loop = asyncio.get_running_loop()
        due = self._due()
        if loop.time() < due:
            self._timer = loop.call_at(due, self._fire)
            return
        self._timer = self._first = None
        self._previous = loop.time()
        began = time.perf_counter()
        found = gc.collect()
        give_free_heap_back()
        log.debug("collected %d objects of ended connections in %.1f ms", found,
                  (time.perf_counter() - began) * 1000)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
