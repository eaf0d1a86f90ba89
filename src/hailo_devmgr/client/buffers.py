"""The client library's registered shared-memory buffers (``AsyncClient``).

A :class:`WritableBuffer` is a memfd the client maps writable and then
seals, so that its own mapping is the only way left to write it;
:class:`ClientBuffers` is a connection's pool of them, registered with the
daemon once and reused request after request (docs/protocol.md, "Registered
buffers"). The seals themselves are defined in :mod:`hailo_devmgr.wire.shm`.
"""
from __future__ import annotations

import asyncio
import fcntl
import mmap
import os
from typing import Any

import numpy as np

from ..wire.shm import F_SEAL_FUTURE_WRITE, PAGE_SIZE, SIZE_SEALS


class WritableBuffer:
    """A client's registered buffer: a memfd mapped writable, then sealed so that
    this mapping is the only way left to write it."""

    def __init__(self, size: int, name: str = "hailo-buffer"):
        self.size = -(-size // PAGE_SIZE) * PAGE_SIZE
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            self.mapping = mmap.mmap(self.fd, self.size)
            self.array = np.frombuffer(self.mapping, np.uint8)
            self.array[:] = 0  # every page written once: the daemon refuses holes
            self.address = self.array.__array_interface__["data"][0]
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SIZE_SEALS | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
        except BaseException:
            self.close()
            raise
        self.buffer_id: int | None = None   # given by the daemon

    def write(self, array_: np.ndarray) -> None:
        """Copy a C-contiguous array to the start of the buffer."""
        np.copyto(self.array[:array_.nbytes], memoryview(array_).cast("B"), casting="no")

    def take_fd(self) -> int:
        """The memfd, for sending once; whoever takes it closes it."""
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.take_fd())
        if getattr(self, "mapping", None) is not None:
            self.array = None
            try:
                self.mapping.close()
            except BufferError:
                pass  # an array still refers to it: unmapped when that goes
            self.mapping = None


class ClientBuffers:
    """A client connection's registered buffers, reused request after request.

    Before a request is packed, :meth:`prepare` makes sure an idle buffer
    fits each large array (registering new ones through ``register``, an
    async callable that sends the memfd and returns the daemon's id, or
    None if the daemon refused it; idle ones are unregistered to stay
    within the daemon's limits). ``place`` (for :func:`transport.pack`)
    copies an array into one and marks it the request's until
    :meth:`release` is called with that request's answer. An array that
    finds no buffer goes in a one-shot memfd instead.

    Buffers can also be handed to the caller for good (:meth:`own`): an
    array that lives in one travels without any copy."""

    def __init__(self, register, unregister, max_count: int, max_bytes: int):
        self._register, self._unregister = register, unregister
        self.max_count, self.max_bytes = max_count, max_bytes
        self._idle: list[WritableBuffer] = []
        self._busy: dict[Any, list[WritableBuffer]] = {}
        self._owned: list[WritableBuffer] = []
        self._closed = False

    def _all(self) -> list[WritableBuffer]:
        return self._idle + self._owned + [buffer for buffers in self._busy.values() for buffer in buffers]

    def _fitting(self, nbytes: int, taken=()) -> WritableBuffer | None:
        """The smallest idle buffer that holds ``nbytes``, but not one twice as big."""
        fits = [b for b in self._idle if nbytes <= b.size < 2 * nbytes + PAGE_SIZE and b not in taken]
        return min(fits, key=lambda b: b.size, default=None)

    def holding(self, array_: np.ndarray) -> tuple[WritableBuffer, int] | None:
        """The owned buffer a C-contiguous array lies in, and its offset there."""
        if not array_.flags.c_contiguous or not array_.nbytes:
            return None
        address = array_.__array_interface__["data"][0]
        for buffer in self._owned:
            start = buffer.address
            if start <= address and address + array_.nbytes <= start + buffer.size:
                return buffer, address - start
        return None

    async def prepare(self, arrays: list[np.ndarray], min_bytes: int) -> None:
        """Idle buffers for the arrays of one request that will need one."""
        sizes = [a.nbytes for a in arrays if a.nbytes >= min_bytes and a.nbytes and self.holding(a) is None]
        taken: list[WritableBuffer] = []
        for nbytes in sorted(sizes, reverse=True):
            buffer = self._fitting(nbytes, taken)
            if buffer is None:
                buffer = await self._new(nbytes, taken)
                if buffer is not None:
                    self._idle.append(buffer)
            if buffer is not None:
                taken.append(buffer)

    async def own(self, nbytes: int) -> WritableBuffer | None:
        """A registered buffer for the caller alone (None: no room for it)."""
        buffer = await self._new(nbytes, [])
        if buffer is not None:
            self._owned.append(buffer)
        return buffer

    async def disown(self, array_: np.ndarray) -> bool:
        """Unregister the owned buffer ``array_`` lies in (False if none)."""
        held = self.holding(array_)
        if held is None:
            return False
        self._owned.remove(held[0])
        await self._retire(held[0])
        return True

    async def _retire(self, buffer: WritableBuffer) -> None:
        """Unregister and close ``buffer``, both even if the caller is cancelled meanwhile."""
        async def retire():
            try:
                await self._unregister(buffer)
            finally:
                buffer.close()
        retiring = asyncio.ensure_future(retire())
        retiring.add_done_callback(lambda task: task.cancelled() or task.exception())
        await asyncio.shield(retiring)

    def _adopt(self, buffer: WritableBuffer, registering: asyncio.Future) -> None:
        """A registration whose caller was cancelled: the daemon may have the buffer
        anyway, so keep it as an idle one (the pool's count matches the daemon's)."""
        ok = not registering.cancelled() and registering.exception() is None and registering.result() is not None
        if ok and not self._closed:
            buffer.buffer_id = registering.result()
            self._idle.append(buffer)
        else:
            buffer.close()

    async def _new(self, nbytes: int, keep: list) -> WritableBuffer | None:
        size = -(-nbytes // PAGE_SIZE) * PAGE_SIZE
        while self._idle and not self._room_for(size):
            spare = [b for b in self._idle if b not in keep]
            if not spare:
                break
            victim = max(spare, key=lambda b: b.size)
            self._idle.remove(victim)
            await self._retire(victim)
        if not self._room_for(size):
            return None
        buffer = WritableBuffer(size)
        registering = asyncio.ensure_future(self._register(buffer))
        try:
            buffer.buffer_id = await asyncio.shield(registering)
        except asyncio.CancelledError:
            registering.add_done_callback(lambda task: self._adopt(buffer, task))
            raise
        except BaseException:
            buffer.close()
            raise
        if buffer.buffer_id is None:
            buffer.close()
            return None
        return buffer

    def _room_for(self, size: int) -> bool:
        present = self._all()
        return len(present) < self.max_count and sum(b.size for b in present) + size <= self.max_bytes

    def placer(self, request_id, min_bytes: int):
        """``place`` for :func:`transport.pack` on behalf of one request."""
        def place(array_: np.ndarray) -> dict | None:
            held = self.holding(array_)
            if held is not None:
                return {"buffer": held[0].buffer_id, "offset": held[1]}
            buffer = self._fitting(array_.nbytes) if array_.nbytes >= min_bytes and array_.nbytes else None
            if buffer is None:
                return None
            self._idle.remove(buffer)
            self._busy.setdefault(request_id, []).append(buffer)
            buffer.write(array_)
            return {"buffer": buffer.buffer_id, "offset": 0}
        return place

    def release(self, request_id) -> None:
        """The answer to ``request_id`` came (or never will): its buffers are free."""
        self._idle.extend(self._busy.pop(request_id, ()))

    def close(self) -> None:
        self._closed = True
        for buffer in self._all():
            buffer.close()
        self._idle, self._busy, self._owned = [], {}, []
