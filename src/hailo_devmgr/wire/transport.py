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
keeps the transport's version, the client's defaults and :func:`pack`;
references.py resolves tensor references (the daemon keeps its attachment
buffers in daemon/attachment_buffers.py).
"""
from __future__ import annotations

from . import codec
from .codec import (MAX_ATTACHMENTS, MAX_FDS, attachment_sizes, check_fds, close_fds, declared_fds,
                    may_have_attachments)

__all__ = ["MAX_ATTACHMENTS", "MAX_FDS", "attachment_sizes", "check_fds", "close_fds", "declared_fds",
           "may_have_attachments", "TRANSPORT_VERSION", "DEFAULT_SHM_MIN_BYTES", "CLIENT_SEND_BUFFER",
           "pack"]

TRANSPORT_VERSION = 2          # of the attachment/shm encoding (hello answers it; 2: registered buffers)
DEFAULT_SHM_MIN_BYTES = 1024 * 1024   # the client's default threshold for shared memory
CLIENT_SEND_BUFFER = 4 * 1024 * 1024   # SO_SNDBUF the client asks for (requests carry the bulk)


# ---------------------------------------------------------------- packing

def pack(message: dict, *, shm_min_bytes: int | None, place=None) -> tuple[bytes, list, list[int]]:
    """A message with ndarrays inside → (header + JSON, attachment buffers, fds):
    :func:`codec.encode`, its first buffer apart."""
    buffers, fds = codec.encode(message, shm_min_bytes=shm_min_bytes, place=place)
    return buffers[0], buffers[1:], fds
