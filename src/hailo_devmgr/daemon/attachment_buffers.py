"""Attachment buffers the daemon keeps for reuse (protocol v2).

The codec reads a frame's attachments straight into buffers it asks for
(``FrameReader(allocate=...)``); the session gives them back once the
request is answered. Large ones are kept here, by size, for the next frame.
"""
from __future__ import annotations

import sys

import numpy as np


class BufferPool:
    """Attachment buffers kept for reuse, by size (event loop only).

    A fresh multi-megabyte buffer costs a page fault per 4 KiB when the
    socket read first writes it, more than the read itself; clients send the
    same sizes again and again (one camera, one model). A returned buffer
    waits in ``_returned`` until nothing else refers to it (its reference
    count is the pool's own: an array or view over it holds one more, and
    the device thread may hold its last job a little longer), and only then
    can it be handed out again, so memory in use is never overwritten."""

    MIN_BYTES = 64 * 1024        # smaller buffers are cheap to allocate
    MAX_RETURNED = 8             # buffers waiting to be released, oldest dropped

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.held = 0            # bytes of idle buffers in _free
        self._free: dict[int, list[np.ndarray]] = {}
        self._returned: list[np.ndarray] = []
        self._lone = self._refs([np.empty(1, np.uint8)], 0)

    @staticmethod
    def _refs(container: list, index: int) -> int:
        return sys.getrefcount(container[index])

    def _sweep(self) -> None:
        """Move returned buffers nothing refers to any more into ``_free``."""
        index = 0
        while index < len(self._returned):
            if self._refs(self._returned, index) > self._lone:
                index += 1
                continue
            block = self._returned.pop(index)
            if self.held + block.size <= self.max_bytes:
                self._free.setdefault(block.size, []).append(block)
                self.held += block.size

    def get(self, size: int) -> np.ndarray:
        if size >= self.MIN_BYTES:
            self._sweep()
            free = self._free.get(size)
            if free:
                self.held -= size
                return free.pop()
        return np.empty(size, np.uint8)

    def put(self, block: np.ndarray) -> None:
        """Give a buffer back (the caller keeps no reference it will use again)."""
        if block.size < self.MIN_BYTES:
            return
        self._returned.append(block)
        del block
        if len(self._returned) > self.MAX_RETURNED:
            del self._returned[0]
        self._sweep()
