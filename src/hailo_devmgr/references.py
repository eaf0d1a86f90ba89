"""Tensor references in a v2 request or answer, resolved to arrays.

A tensor in a v2 frame refers to one of the frame's attachments, one of
its descriptors (a sealed memfd) or a buffer registered on the connection::

    {"dtype": "uint8", "shape": [h, w, 3], "attachment": 0}
    {"dtype": "uint8", "shape": [h, w, 3], "shm": 0, "offset": 0}
    {"dtype": "uint8", "shape": [h, w, 3], "buffer": 1, "offset": 0}

Everything here is pure apart from mapping memfds, and raises
:class:`~hailo_devmgr.protocol.RequestError` for a bad reference.
"""
from __future__ import annotations

import math
import os
import threading
from typing import Any

import numpy as np

from . import shm
from .protocol import BAD_REQUEST, RequestError
from .tensors import DecodedTensor, check_dtype, check_shape
from .transport import close_fds


class Blocks:
    """The attachments, descriptors and registered buffers one frame may refer to.

    ``close`` closes every descriptor (mappings stay valid while arrays use
    them). Mapping (in a worker thread) and closing (there, or on the event
    loop when the client goes away) take a lock, so a descriptor number is
    never used after it was closed."""

    def __init__(self, attachments: list | None = None, fds: list[int] | None = None,
                 buffers: "shm.RegisteredBuffers | None" = None):
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

    def using_fd(self, index: Any, use, where: str):
        """``use(fd)`` on a duplicate of descriptor ``index``: mapping a large memfd
        takes a while, and ``close`` (on the event loop) must not wait for it."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.fds):
            raise RequestError(BAD_REQUEST, f"{where}shm {index!r} does not exist (the frame has "
                                            f"{len(self.fds)} file descriptor(s))")
        with self._lock:
            if self._closed:
                raise RequestError(BAD_REQUEST, f"{where}shm {index}: the request was abandoned")
            fd = os.dup(self.fds[index])
        try:
            return use(fd)
        finally:
            os.close(fd)

    def shm(self, index: Any, offset: int, nbytes: int, where: str) -> "shm.Mapped | None":
        """The bytes of a one-shot memfd a tensor uses, mapped (None if there are none)."""
        return self.using_fd(index, lambda fd: shm.map_one_shot(fd, offset, nbytes, f"{where}shm {index}"), where)

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


def tensor_from(ref: dict, blocks: Blocks, where: str, max_elements: int) -> np.ndarray:
    """One reference → a read-only ndarray over the attachment or the mapping."""
    prefix = f"{where}: " if where else ""
    if "dtype" not in ref or "shape" not in ref:
        raise RequestError(BAD_REQUEST, f"{prefix}tensor must include dtype and shape", field=where)
    if sum(key in ref for key in REFERENCE_KEYS) != 1:
        raise RequestError(BAD_REQUEST, f"{prefix}tensor must refer to exactly one of attachment, shm or "
                                        f"buffer", field=where)
    dtype = check_dtype(ref["dtype"], prefix)
    shape = check_shape(ref["shape"], prefix, max_elements)
    nbytes = math.prod(shape) * dtype.itemsize
    if "attachment" in ref:
        data = blocks.attachment(ref["attachment"], prefix)
        if len(data) != nbytes:
            raise RequestError(BAD_REQUEST, f"{prefix}attachment {ref['attachment']} has {len(data)} bytes "
                                            f"but dtype {dtype.name} and shape {list(shape)} need {nbytes}")
        array_ = np.frombuffer(data, dtype=dtype)
    else:
        offset = ref.get("offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset % dtype.itemsize:
            raise RequestError(BAD_REQUEST, f"{prefix}offset must be an integer >= 0 and a multiple of "
                                            f"{dtype.itemsize} (the dtype's size), got {offset!r}")
        mapped = (blocks.shm(ref["shm"], offset, nbytes, prefix) if "shm" in ref
                  else blocks.buffer(ref["buffer"], offset, nbytes, prefix))
        array_ = (shm.array_over(mapped, dtype, nbytes // dtype.itemsize)
                  if mapped is not None and nbytes else np.empty(0, dtype))
    try:
        array_ = array_.reshape(shape)
    except ValueError as exc:  # e.g. a 0 with a size past numpy's index range
        raise RequestError(BAD_REQUEST, f"{prefix}shape {list(shape)} is not usable: {exc}") from None
    array_.flags.writeable = False
    return array_


def resolve(value: Any, blocks: Blocks, max_elements: int, where: str = "", as_array: bool = False) -> Any:
    """Replace every attachment/shm reference inside ``value`` (dicts, lists).

    The daemon gets :class:`DecodedTensor` (a dict, so handlers that test
    for a tensor dict accept it; ``tensors.decode_v1`` returns its array);
    the client, with ``as_array``, plain ndarrays."""
    if is_reference(value):
        array_ = tensor_from(value, blocks, where, max_elements)
        return array_ if as_array else DecodedTensor(array_)
    if isinstance(value, dict):
        return {key: resolve(item, blocks, max_elements, f"{where}.{key}" if where else str(key), as_array)
                for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item, blocks, max_elements, f"{where}[{index}]", as_array)
                for index, item in enumerate(value)]
    return value


def has_references(value: Any) -> bool:
    if is_reference(value):
        return True
    if isinstance(value, dict):
        return any(has_references(item) for item in value.values())
    if isinstance(value, list):
        return any(has_references(item) for item in value)
    return False
