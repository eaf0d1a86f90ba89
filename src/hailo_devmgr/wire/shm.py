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

Only what both sides use is here: the seals, creating and checking memfds,
read-only mappings and their limits. The daemon's per-connection registry
of buffers is :mod:`hailo_devmgr.daemon.shm_buffers`; the client's writable
buffers and their pool are :mod:`hailo_devmgr.client.buffers`. No asyncio.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
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
