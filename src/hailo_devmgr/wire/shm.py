"""Shared memory for protocol v2 tensors: memfds, their seals, read-only mappings.

Used by both sides (docs/protocol.md, "Protocol v2: binary attachments and
shared memory"). Two kinds of memfd carry tensors:

- a **one-shot memfd** comes with one request (``"shm": k``) and is sealed
  against every change (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE``):
  simple, but every request pays for fresh pages (allocating, zeroing and
  freeing them costs several times the copy itself);
- a **registered buffer** (``register_buffer``, then ``"buffer": id`` in as
  many requests as wanted) is sealed against resizing and against any *new*
  way of writing (``F_SEAL_FUTURE_WRITE``): the client keeps the writable
  mapping it made before sealing and rewrites its tensors there, so its
  pages are allocated once. Nobody else can write it, punch holes in it or
  resize it; the client may only change it through its own mapping, and the
  protocol makes a region the daemon's from the request that names it until
  that request's answer.

Why the seals matter to the daemon: a memfd that shrank under a mapping
would kill the daemon with SIGBUS, and reading a page the client never
wrote (a hole) would allocate it in the *daemon's* memory cgroup; so sizes
are sealed and the bytes a tensor uses must all be written (checked with
``SEEK_HOLE``). The daemon maps a one-shot memfd once per request,
read-only, however many tensors refer to it, populates only the pages
those tensors use, and closes every descriptor once it is mapped: a
mapping holds the memory, not a descriptor. (Mapping it once per tensor
let 400 references to one 512 MiB memfd cost the daemon 392 MiB of page
tables.)
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import mmap
import os
import stat
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from .protocol import BAD_REQUEST, RequestError

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)   # Linux 5.1; not in Python 3.11
# One-shot memfds: nothing about them may change once sent.
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
# Registered buffers: fixed size, and no writer but the mapping the client already has.
SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
MAX_BUFFERS = 16               # registered buffers per connection
PAGE_SIZE = mmap.PAGESIZE


def _memfd_device() -> int:
    """The device number every plain memfd has (the kernel's internal tmpfs)."""
    fd = os.memfd_create("hailo-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


_MEMFD_DEVICE = _memfd_device()


def create_memfd(array_: np.ndarray, name: str = "hailo-tensor") -> int:
    """A one-shot sealed memfd holding ``array_`` (C-contiguous); the caller closes it."""
    data = memoryview(array_).cast("B")
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        written = 0
        while written < len(data):  # write(2): half the cost of faulting pages in through a mapping
            written += os.pwrite(fd, data[written:], written)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_memfd(fd: int, where: str, *, reusable: bool = False) -> int:
    """Check that ``fd`` is a memfd sealed as its kind requires; its size in bytes."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EBADF):
            raise RequestError(BAD_REQUEST, f"{where} is not a memfd (shared memory must be a sealed "
                                            f"memfd)") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_dev != _MEMFD_DEVICE:
        # Another filesystem (a hugetlb memfd, say) answers SEEK_HOLE differently: no holes check.
        raise RequestError(BAD_REQUEST, f"{where} is not a memfd (a plain memfd_create one, no MFD_HUGETLB)")
    if reusable:
        if seals & SIZE_SEALS != SIZE_SEALS or not seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
            raise RequestError(BAD_REQUEST, f"{where} must be sealed with F_SEAL_SHRINK, F_SEAL_GROW and "
                                            f"F_SEAL_FUTURE_WRITE (or F_SEAL_WRITE) (seals: {seals:#x})")
    elif seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise RequestError(BAD_REQUEST, f"{where} must be sealed with F_SEAL_SHRINK, F_SEAL_GROW and "
                                        f"F_SEAL_WRITE (seals: {seals:#x})")
    return info.st_size


def check_written(fd: int, offset: int, nbytes: int, where: str) -> None:
    """Every page of ``[offset, offset + nbytes)`` exists: reading a hole would
    allocate it, charged to the daemon's memory."""
    if nbytes and os.lseek(fd, offset, os.SEEK_HOLE) < offset + nbytes:
        raise RequestError(BAD_REQUEST, f"{where} has unwritten pages (a hole) in bytes {offset} to "
                                        f"{offset + nbytes}: write every byte a tensor uses before sending it")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MAP_FAILED = ctypes.c_void_p(-1).value
MADV_POPULATE_READ = 22        # Linux 5.14; not in Python 3.11's mmap


@dataclass
class Mapped:
    """Read-only mapped bytes: ``memory`` (unmapped when the last array over it
    is gone) and where the wanted bytes start in it."""

    memory: Any
    start: int


def map_read_only(fd: int, offset: int, nbytes: int, populate: bool = True) -> Mapped:
    """A read-only shared mapping of ``nbytes`` at ``offset`` (whole pages around them).

    Unlike ``mmap.mmap`` (which keeps a dup of the descriptor as long as the
    mapping), it holds no descriptor: the caller closes ``fd`` at once.
    MAP_POPULATE maps every page in one call instead of a fault per page;
    without ``populate`` no page is touched (see :func:`populate_read`)."""
    first = offset - offset % PAGE_SIZE
    size = offset + nbytes - first
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    address = _libc.mmap(None, size, mmap.PROT_READ, flags, fd, first)
    if address is None or address == _MAP_FAILED:
        code = ctypes.get_errno()
        raise RequestError(BAD_REQUEST, f"the shared memory could not be mapped: {os.strerror(code)}")
    memory = (ctypes.c_char * size).from_address(address)
    weakref.finalize(memory, _libc.munmap, address, size)
    return Mapped(memory, offset - first)


def populate_read(mapped: Mapped, start: int, nbytes: int) -> None:
    """Map the pages of ``nbytes`` from ``start`` (bytes into ``mapped.memory``) in one call.

    Only an optimisation: on a kernel without MADV_POPULATE_READ the pages
    are faulted in as they are read (they exist: holes were refused)."""
    first = start - start % PAGE_SIZE
    _libc.madvise(ctypes.addressof(mapped.memory) + first, start + nbytes - first, MADV_POPULATE_READ)


def array_over(mapped: Mapped, dtype: np.dtype, count: int) -> np.ndarray:
    return np.frombuffer(mapped.memory, dtype=dtype, count=count, offset=mapped.start)


def used_ranges(uses: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (start, end) byte ranges that ``(offset, nbytes)`` uses cover, merged and sorted."""
    merged: list[list[int]] = []
    for offset, nbytes in sorted(use for use in uses if use[1]):
        if merged and offset <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], offset + nbytes)
        else:
            merged.append([offset, offset + nbytes])
    return [(start, end) for start, end in merged]


def map_one_shot(fd: int, uses: list[tuple[int, int, str]], where: str) -> Mapped | None:
    """Check a one-shot memfd and map, once, the bytes a request's tensors use in it.

    ``uses``: ``(offset, nbytes, where)`` of each tensor in it. One mapping
    spans them all and every tensor's view is sliced from it; only the
    pages some tensor uses are checked for holes and populated, so time and
    page tables grow with the distinct bytes used, not with the number of
    references. The mapping's ``start`` is where the lowest used byte is
    (None when no tensor has bytes)."""
    size = check_memfd(fd, where)
    for offset, nbytes, name in uses:
        if offset + nbytes > size:
            raise RequestError(BAD_REQUEST, f"{name} has {size} bytes, too small for {nbytes} bytes at "
                                            f"offset {offset}")
    ranges = used_ranges([(offset, nbytes) for offset, nbytes, _ in uses])
    if not ranges:
        return None
    for start, end in ranges:
        check_written(fd, start, end - start, where)
    low, high = ranges[0][0], ranges[-1][1]
    whole = len(ranges) == 1  # no gap: MAP_POPULATE does it all
    mapped = map_read_only(fd, low, high - low, populate=whole)
    if not whole:  # gaps (perhaps holes, perhaps large) are never touched
        for start, end in ranges:
            populate_read(mapped, mapped.start + start - low, end - start)
    return mapped


# ---------------------------------------------------------------- daemon side

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


# ---------------------------------------------------------------- client side

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
