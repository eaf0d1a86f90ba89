"""Protocol v2 fast tensor transport: what daemon and clients share beyond the codec.

A v2 frame is a v1 frame (4-byte big-endian length, then that many bytes of
JSON) followed by the raw blocks its JSON lists in ``"attachments": [n0,
n1, ...]``, back to back; file descriptors (sealed memfds) ride in the same
``sendmsg`` as the frame's first byte, as ``SCM_RIGHTS``, and the JSON
counts them in ``"fds": N`` (docs/protocol.md, section 12). A tensor refers
to a block by index::

    {"dtype": "uint8", "shape": [h, w, 3], "attachment": 0}
    {"dtype": "uint8", "shape": [h, w, 3], "shm": 0, "offset": 0}

Framing, both ways, is :mod:`hailo_devmgr.wire.codec` (its checks and
limits are re-exported here); the sockets are in
:mod:`hailo_devmgr.client.stream` (``wire/`` has no asyncio). This module
keeps the transport's version, the client's defaults, :func:`pack` and the
daemon's :class:`BufferPool`; references.py resolves tensor references.
"""
from __future__ import annotations

import sys

import numpy as np

from . import codec
from .codec import (MAX_ATTACHMENTS, MAX_FDS, attachment_sizes, check_fds, close_fds, declared_fds,
                    may_have_attachments)

__all__ = ["MAX_ATTACHMENTS", "MAX_FDS", "attachment_sizes", "check_fds", "close_fds", "declared_fds",
           "may_have_attachments", "TRANSPORT_VERSION", "DEFAULT_SHM_MIN_BYTES", "CLIENT_SEND_BUFFER",
           "BufferPool", "pack"]

TRANSPORT_VERSION = 2          # of the attachment/shm encoding (hello answers it; 2: registered buffers)
DEFAULT_SHM_MIN_BYTES = 1024 * 1024   # the client's default threshold for shared memory
CLIENT_SEND_BUFFER = 4 * 1024 * 1024   # SO_SNDBUF the client asks for (requests carry the bulk)


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


# ---------------------------------------------------------------- packing

def pack(message: dict, *, shm_min_bytes: int | None, place=None) -> tuple[bytes, list, list[int]]:
    """A message with ndarrays inside → (header + JSON, attachment buffers, fds):
    :func:`codec.encode`, its first buffer apart."""
    buffers, fds = codec.encode(message, shm_min_bytes=shm_min_bytes, place=place)
    return buffers[0], buffers[1:], fds
