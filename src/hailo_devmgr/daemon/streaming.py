"""Tokens from the device thread to the client that asked for them.

A streamed request (``infer`` with ``"stream": true`` on protocol v2) runs
as one device job that calls ``TokenStream.on_token`` for each piece of
text the model yields. The device thread only appends to a bounded buffer
and, if no wake-up is pending, schedules one on the event loop: one
wake-up per batch of tokens, however fast they come. The session's writer
(``forward``) sends what has gathered as one chunk frame per wake-up.

The device never waits for a client. When more than ``max_pending_bytes``
of text is waiting because the client does not read, or when the client
cancels or goes away, ``on_token`` answers False and the handler leaves
HailoRT's generation at once (done_reason ``cancelled``, with the reason).
"""
from __future__ import annotations

import asyncio
import threading

# Text waiting for a slow reader before its generation is stopped: far more
# than any answer's text (a 4k-token answer is ~16 KiB), far less than memory.
MAX_PENDING_BYTES = 256 * 1024


class TokenStream:
    def __init__(self, loop: asyncio.AbstractEventLoop, max_pending_bytes: int = MAX_PENDING_BYTES):
        self._loop = loop
        self._max = max_pending_bytes
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._pending = 0
        self._wake_pending = False
        self._ready = asyncio.Event()      # event loop side
        self._finished = False             # the device job is over (event loop side)
        self.stop_reason: str | None = None

    # -- device thread ----------------------------------------------------------

    def on_token(self, text: str) -> bool:
        """Keep ``text`` for the client; False: stop generating."""
        if self.stop_reason is not None:
            return False
        size = len(text.encode("utf-8", "surrogatepass"))
        with self._lock:
            self._parts.append(text)
            self._pending += size
            over = self._pending > self._max
            wake, self._wake_pending = not self._wake_pending, True
        if over:
            self.stop(f"the client did not read its tokens ({self._pending} bytes waiting, "
                      f"at most {self._max})")
        if wake:
            self._loop.call_soon_threadsafe(self._ready.set)
        return not over

    # -- event loop -------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Stop the generation at its next token (the first reason stays)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def finish(self) -> None:
        """The device job is over: the writer sends what is left, then ends."""
        self._finished = True
        self._ready.set()

    def _take(self) -> str:
        with self._lock:
            parts, self._parts = self._parts, []
            self._pending = 0
            self._wake_pending = False
        return "".join(parts)

    async def forward(self, send) -> None:
        """Send each batch of text as ``await send(text)`` until the job is over
        and everything gathered has gone out."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            finished = self._finished   # read before taking: nothing comes after it
            text = self._take()
            if text:
                await send(text)
            if finished:
                return
