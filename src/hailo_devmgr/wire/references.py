"""Tensor references in a v2 request or answer, resolved to arrays.

A tensor in a v2 frame refers to one of the frame's attachments, one of
its descriptors (a sealed memfd) or a buffer registered on the connection::

    {"dtype": "uint8", "shape": [h, w, 3], "attachment": 0}
    {"dtype": "uint8", "shape": [h, w, 3], "shm": 0, "offset": 0}
    {"dtype": "uint8", "shape": [h, w, 3], "buffer": 1, "offset": 0}

Everything here is pure apart from mapping memfds, and raises
:class:`~hailo_devmgr.wire.protocol.RequestError` for a bad reference.

A request's references are all found and checked (and, in the daemon,
counted and their bytes summed) before anything is mapped: a request that
names too much is refused at once, whatever it names. Each memfd is then
mapped once, however many references point into it.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np

from . import shm
from .protocol import BAD_REQUEST, TOO_LARGE, RequestError
from .tensors import DecodedTensor, check_dtype, check_shape
from .transport import close_fds

# Per request, in the daemon. As many tensors as a frame may carry attachments.
MAX_REFERENCES = 256
# The bytes all references of one request name together (a memfd referred to
# twice counts twice): bounds what a request can make the daemon map, populate
# and check, whatever the memfds' sizes. Four times the largest float32 tensor
# max_tensor_elements allows by default.
MAX_REFERENCED_BYTES = 1 << 30


class BufferViews(Protocol):
    """Registered buffers a frame may refer to, as :class:`Blocks` needs them (the
    daemon's per-connection registry, ``daemon/shm_buffers.py``, is one)."""

    def view(self, buffer_id: Any, offset: int, nbytes: int, where: str) -> shm.Mapped: ...


class Blocks:
    """The attachments, descriptors and registered buffers one frame may refer to.

    ``close`` closes every descriptor (mappings stay valid while arrays use
    them). Mapping (in a worker thread) and closing (there, or on the event
    loop when the client goes away) take a lock, so a descriptor number is
    never used after it was closed."""

    def __init__(self, attachments: list | None = None, fds: list[int] | None = None,
                 buffers: BufferViews | None = None):
        self.attachments = attachments if attachments is not None else []
        self.fds = fds if fds is not None else []
        self.buffers = buffers
        self._lock = threading.Lock()
        self._closed = False

    def attachment(self, index: Any, where: str) -> memoryview:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.attachments):
            raise RequestError(BAD_REQUEST, f"{where}attachment {index!r} does not exist (the frame has "
                                            f"{len(self.attachments)} attachment(s))")
        return memoryview(self.attachments[index]).cast("B")

    def fd_index(self, index: Any, where: str) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.fds):
            raise RequestError(BAD_REQUEST, f"{where}shm {index!r} does not exist (the frame has "
                                            f"{len(self.fds)} file descriptor(s))")
        return index

    def using_fd(self, index: Any, use, where: str):
        """``use(fd)`` on a duplicate of descriptor ``index``: mapping a large memfd
        takes a while, and ``close`` (on the event loop) must not wait for it."""
        index = self.fd_index(index, where)
        with self._lock:
            if self._closed:
                raise RequestError(BAD_REQUEST, f"{where}shm {index}: the request was abandoned")
            fd = os.dup(self.fds[index])
        try:
            return use(fd)
        finally:
            os.close(fd)

    def shm(self, index: Any, uses: list[tuple[int, int, str]], where: str) -> "shm.Mapped | None":
        """One mapping of the bytes the tensors ``uses`` (offset, nbytes, where) take
        in one-shot memfd ``index`` (None if they take none)."""
        return self.using_fd(index, lambda fd: shm.map_one_shot(fd, uses, f"{where}shm {index}"), where)

    def buffer(self, buffer_id: Any, offset: int, nbytes: int, where: str) -> "shm.Mapped":
        if self.buffers is None:
            raise RequestError(BAD_REQUEST, f"{where}buffer {buffer_id!r}: no registered buffers here")
        return self.buffers.view(buffer_id, offset, nbytes, where)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            close_fds(self.fds)


REFERENCE_KEYS = ("attachment", "shm", "buffer")


def is_reference(value: Any) -> bool:
    return isinstance(value, dict) and "data_b64" not in value and any(key in value for key in REFERENCE_KEYS)


@dataclass
class Reference:
    """One tensor reference, checked in itself (not yet against the frame)."""

    source: dict          # the reference as sent
    prefix: str           # "input_data.x: ", for messages
    dtype: np.dtype
    shape: tuple
    nbytes: int
    offset: int           # in the memfd or buffer (0 for an attachment)


def check_reference(ref: dict, where: str, max_elements: int) -> Reference:
    """Everything about a reference that needs no attachment and no memfd."""
    prefix = f"{where}: " if where else ""
    if "dtype" not in ref or "shape" not in ref:
        raise RequestError(BAD_REQUEST, f"{prefix}tensor must include dtype and shape", field=where)
    if sum(key in ref for key in REFERENCE_KEYS) != 1:
        raise RequestError(BAD_REQUEST, f"{prefix}tensor must refer to exactly one of attachment, shm or "
                                        f"buffer", field=where)
    dtype = check_dtype(ref["dtype"], prefix)
    shape = check_shape(ref["shape"], prefix, max_elements)
    offset = 0
    if "attachment" not in ref:
        offset = ref.get("offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset % dtype.itemsize:
            raise RequestError(BAD_REQUEST, f"{prefix}offset must be an integer >= 0 and a multiple of "
                                            f"{dtype.itemsize} (the dtype's size), got {offset!r}")
    return Reference(ref, prefix, dtype, shape, math.prod(shape) * dtype.itemsize, offset)


def find_references(value: Any, where: str = "") -> Iterator[tuple[dict, str]]:
    """Every reference inside ``value`` (dicts, lists) and where it is, in order."""
    if is_reference(value):
        yield value, where
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from find_references(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from find_references(item, f"{where}[{index}]")


def checked_references(value: Any, max_elements: int, where: str = "", max_count: int | None = None,
                       max_bytes: int | None = None) -> list[Reference]:
    """The references inside ``value``, each checked, within ``max_count`` and
    ``max_bytes`` (None: no bound) together; nothing is mapped yet."""
    found = find_references(value, where)
    if max_count is not None:
        found = list(itertools.islice(found, max_count + 1))  # never walks far past the bound
        if len(found) > max_count:
            raise RequestError(TOO_LARGE, f"{where or 'the request'} has more than {max_count} tensor "
                                          f"references (at most {max_count} per request)")
    checked = [check_reference(ref, at, max_elements) for ref, at in found]
    total = sum(ref.nbytes for ref in checked)
    if max_bytes is not None and total > max_bytes:
        raise RequestError(TOO_LARGE, f"the tensor references of {where or 'the request'} name {total} bytes "
                                      f"in all, over the limit of {max_bytes} per request (a memfd referred "
                                      f"to twice counts twice)")
    return checked


def _shm_mappings(checked: list[Reference], blocks: Blocks) -> dict[int, tuple]:
    """One mapping per one-shot memfd the references use: index -> (mapping or
    None, the memfd offset where the mapping's ``start`` is)."""
    by_index: dict[int, list[Reference]] = {}
    for ref in checked:
        if "shm" in ref.source:
            by_index.setdefault(blocks.fd_index(ref.source["shm"], ref.prefix), []).append(ref)
    mappings = {}
    for index, refs in by_index.items():
        uses = [(ref.offset, ref.nbytes, f"{ref.prefix}shm {index}") for ref in refs]
        low = min((ref.offset for ref in refs if ref.nbytes), default=0)
        mappings[index] = (blocks.shm(index, uses, refs[0].prefix), low)
    return mappings


def _array(ref: Reference, blocks: Blocks, mappings: dict) -> np.ndarray:
    source, prefix, nbytes = ref.source, ref.prefix, ref.nbytes
    if "attachment" in source:
        data = blocks.attachment(source["attachment"], prefix)
        if len(data) != nbytes:
            raise RequestError(BAD_REQUEST, f"{prefix}attachment {source['attachment']} has {len(data)} bytes "
                                            f"but dtype {ref.dtype.name} and shape {list(ref.shape)} need "
                                            f"{nbytes}")
        return np.frombuffer(data, dtype=ref.dtype)
    if "buffer" in source:
        mapped = blocks.buffer(source["buffer"], ref.offset, nbytes, prefix)
    elif nbytes:
        whole, low = mappings[source["shm"]]
        mapped = shm.Mapped(whole.memory, whole.start + ref.offset - low)  # a view of the one mapping
    if not nbytes:
        return np.empty(0, ref.dtype)
    return shm.array_over(mapped, ref.dtype, nbytes // ref.dtype.itemsize)


def tensor_of(ref: Reference, blocks: Blocks, mappings: dict) -> np.ndarray:
    """One checked reference → a read-only ndarray over the attachment or the mapping."""
    array_ = _array(ref, blocks, mappings)
    try:
        array_ = array_.reshape(ref.shape)
    except ValueError as exc:  # e.g. a 0 with a size past numpy's index range
        raise RequestError(BAD_REQUEST, f"{ref.prefix}shape {list(ref.shape)} is not usable: {exc}") from None
    array_.flags.writeable = False
    return array_


def resolve(value: Any, blocks: Blocks, max_elements: int, where: str = "", as_array: bool = False, *,
            max_count: int | None = None, max_bytes: int | None = None) -> Any:
    """Replace every attachment/shm/buffer reference inside ``value`` (dicts, lists).

    The daemon gets :class:`DecodedTensor` (a dict, so handlers that test
    for a tensor dict accept it; ``tensors.decode_v1`` returns its array)
    and bounds the references with ``max_count`` and ``max_bytes``; the
    client, with ``as_array``, plain ndarrays."""
    checked = checked_references(value, max_elements, where, max_count, max_bytes)
    mappings = _shm_mappings(checked, blocks)
    arrays = {id(ref.source): tensor_of(ref, blocks, mappings) for ref in checked}
    return _replaced(value, arrays, as_array)


def _replaced(value: Any, arrays: dict[int, np.ndarray], as_array: bool) -> Any:
    if is_reference(value):
        return arrays[id(value)] if as_array else DecodedTensor(arrays[id(value)])
    if isinstance(value, dict):
        return {key: _replaced(item, arrays, as_array) for key, item in value.items()}
    if isinstance(value, list):
        return [_replaced(item, arrays, as_array) for item in value]
    return value


def has_references(value: Any) -> bool:
    if is_reference(value):
        return True
    if isinstance(value, dict):
        return any(has_references(item) for item in value.values())
    if isinstance(value, list):
        return any(has_references(item) for item in value)
    return False
