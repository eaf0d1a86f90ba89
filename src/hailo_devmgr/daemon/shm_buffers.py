"""The daemon's registered shared-memory buffers, one registry per connection.

A client registers a memfd (``register_buffer``), then names it in as many
v2 requests as it wants (``"buffer": id``); see docs/protocol.md,
"Registered buffers". The seals and checks every memfd goes through, and the
read-only mappings, are the shared ones in :mod:`hailo_devmgr.wire.shm`;
here is only what the daemon keeps per connection.
"""
from __future__ import annotations

import threading
from typing import Any

from ..wire.protocol import BAD_REQUEST, RequestError
from ..wire.shm import MAX_BUFFERS, Mapped, check_memfd, check_written, map_read_only


class RegisteredBuffers:
    """A connection's registered buffers: id -> whole read-only mapping.

    Registered and unregistered on the event loop, read by worker threads
    that resolve tensors (hence the lock). A request that already holds an
    array over a buffer keeps it mapped after ``unregister``."""

    def __init__(self, max_bytes: int, max_count: int = MAX_BUFFERS):
        self.max_bytes = max_bytes
        self.max_count = max_count
        self._buffers: dict[int, Mapped] = {}
        self._sizes: dict[int, int] = {}
        self._next_id = 1
        self._lock = threading.Lock()

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def count(self) -> int:
        return len(self._sizes)

    def register(self, fd: int, where: str) -> tuple[int, int]:
        """Map a checked memfd; (buffer id, size). The caller still closes ``fd``."""
        size = check_memfd(fd, where, reusable=True)
        if size == 0:
            raise RequestError(BAD_REQUEST, f"{where} is empty: a buffer needs a size")
        with self._lock:  # room reserved first; the slow checking and mapping outside the lock
            if len(self._sizes) >= self.max_count:
                raise RequestError(BAD_REQUEST, f"At most {self.max_count} registered buffers per connection: "
                                                f"unregister one first")
            if self.total_bytes + size > self.max_bytes:
                raise RequestError(BAD_REQUEST, f"Registered buffers of one connection may total at most "
                                                f"{self.max_bytes} bytes (shm_buffer_max_bytes); this one has "
                                                f"{size} and {self.total_bytes} are registered")
            buffer_id = self._next_id
            self._next_id += 1
            self._sizes[buffer_id] = size
        try:
            check_written(fd, 0, size, where)
            mapped = map_read_only(fd, 0, size)
        except BaseException:
            with self._lock:
                self._sizes.pop(buffer_id, None)
            raise
        with self._lock:
            if buffer_id in self._sizes:  # not cleared meanwhile (the connection ended)
                self._buffers[buffer_id] = mapped
        return buffer_id, size

    def size_of(self, buffer_id: Any) -> int:
        """The size of a registered buffer (0 for an unknown id)."""
        with self._lock:
            return self._sizes.get(buffer_id, 0) if isinstance(buffer_id, int) else 0

    def unregister(self, buffer_id: Any) -> int:
        """Forget a buffer; its size."""
        with self._lock:
            self._buffers.pop(self._known(buffer_id, ""), None)
            return self._sizes.pop(buffer_id, 0)

    def view(self, buffer_id: Any, offset: int, nbytes: int, where: str) -> Mapped:
        with self._lock:
            buffer_id = self._known(buffer_id, where)
            whole, size = self._buffers[buffer_id], self._sizes[buffer_id]
        if offset + nbytes > size:
            raise RequestError(BAD_REQUEST, f"{where}buffer {buffer_id} has {size} bytes, too small for "
                                            f"{nbytes} bytes at offset {offset}")
        return Mapped(whole.memory, offset)

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._sizes.clear()

    def _known(self, buffer_id: Any, where: str) -> int:
        if isinstance(buffer_id, bool) or not isinstance(buffer_id, int) or buffer_id not in self._buffers:
            raise RequestError(BAD_REQUEST, f"{where}buffer {buffer_id!r} is not a registered buffer of "
                                            f"this connection (register_buffer first)")
        return buffer_id
