"""Listening: the socket (systemd's, or bound here), accepting, and the
connection slots (``max_connections``, ``max_connections_per_uid``). Each
accepted connection becomes a session (session.py) that hands its
requests to the dispatcher (dispatch.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time
from typing import Callable

from .session import Session
from ..wire import codec
from ..wire import protocol as p
from ..wire.protocol import RequestError

log = logging.getLogger(__name__)

def bind_unix_socket(path: str, mode: int, dir_mode: int) -> socket.socket:
    """Bind ``path`` ourselves (started by hand, not by systemd)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=dir_mode, exist_ok=True)
    if os.path.lexists(path):
        _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bind under a restrictive umask so there is no moment when the
        # socket is more open than `mode`.
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _remove_stale_socket(path: str) -> None:
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise OSError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left over from a crash
        return
    finally:
        probe.close()
    raise OSError(f"another daemon is already listening on {path}")


def refuse_connections(listener: socket.socket, reason: str, seconds: float) -> None:
    """For ``seconds``, answer every request on ``listener`` with ``reason``.

    Blocking and minimal on purpose: it runs when the daemon cannot start
    (no config, no event loop), only to tell waiting clients why.
    """
    error = RequestError(p.DEVICE_UNAVAILABLE, f"The device manager cannot start: {reason}")
    deadline = time.monotonic() + seconds
    listener.setblocking(True)
    while (left := deadline - time.monotonic()) > 0:
        listener.settimeout(left)
        try:
            conn, _ = listener.accept()
        except OSError:  # timeout: nobody else is waiting
            return
        with conn:
            conn.settimeout(0.2)
            request = _first_request(conn)
            try:
                conn.sendall(p.encode_frame(p.error_response(request, error)))
                _close_gently(conn)
            except OSError:
                pass


def _close_gently(conn: socket.socket) -> None:
    """End our side, then take what the client still sends until it closes
    (briefly): closing a Unix socket with unread input resets the peer, which
    would then lose the answer just written (a slow client's first request
    may come after it)."""
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(0.5)
    for _ in range(64):
        if not conn.recv(64 * 1024):
            return


def _first_request(conn: socket.socket) -> p.Request | None:
    """The client's first request, if it comes at once whole (for its request_id)."""
    reader = codec.FrameReader(64 * 1024, v2=False)
    try:
        while True:
            frames = reader.frames()
            if frames:
                request_id, has_id = p.request_id_of(frames[0].message or {})
                return p.Request("", frames[0].message or {}, request_id, has_id)
            data = conn.recv(64 * 1024)
            if not data:
                return None
            reader.feed(data)
    except (OSError, RequestError):
        return None  # answered anyway, without a request_id
    finally:
        reader.close()


class Listener:
    """Accepts connections and runs one session per connection;
    ``connection_ended()`` is called when one ends, admitted or not."""

    def __init__(self, dispatcher, connection_ended: Callable[[], None] | None = None):
        self.dispatcher = dispatcher
        self._connection_ended = connection_ended
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._starting: set[asyncio.Task] = set()   # every connection task, admitted or not
        self._connections: set[asyncio.Task] = set()

    async def start(self, listener: socket.socket) -> None:
        # Report the path we really listen on (systemd's, when activated).
        bound = listener.getsockname()
        if isinstance(bound, str) and bound:
            self.dispatcher.socket_path = bound
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.ensure_future(self._accept_loop(listener))

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept connections; each becomes a session (session.py) on its raw socket."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and the like: wait, do not spin
                log.warning("accepting a connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.ensure_future(self._connection(sock))
            self._starting.add(task)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        self._starting.discard(task)
        if self._connection_ended is not None:
            self._connection_ended()

    def stop_accepting(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            self._listener.close()

    async def close_connections(self, grace_s: float) -> None:
        """Let answers already on their way go out, then cut the rest."""
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=grace_s)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._accepting is not None:
            await asyncio.gather(self._accepting, return_exceptions=True)


    async def _connection(self, sock: socket.socket) -> None:
        connection = Session(self.dispatcher, sock)
        refusal = self._over_connection_limit(connection)
        if refusal is not None:
            log.warning("refused a connection: %s", refusal.message,
                        extra={**connection.peer.log_fields(), "CODE": refusal.code})
            await self._refuse(connection, refusal)
            return
        connection.default_priority = self.dispatcher.admission.configured_priority(connection.peer, connection.unit)
        task = asyncio.current_task()
        self._connections.add(task)
        self.dispatcher.sessions[connection.id] = connection
        try:
            await connection.run()
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            self.dispatcher.sessions.pop(connection.id, None)

    def _over_connection_limit(self, connection: Session) -> RequestError | None:
        config = self.dispatcher.config
        same_uid = sum(1 for other in self.dispatcher.sessions.values() if other.peer.uid == connection.peer.uid)
        if same_uid >= config.max_connections_per_uid:
            what = f"uid {connection.peer.uid} has {same_uid} connections (max_connections_per_uid)"
        elif len(self.dispatcher.sessions) >= config.max_connections and not self._make_room_for(connection, same_uid):
            what = f"the daemon has {len(self.dispatcher.sessions)} connections (max_connections)"
        else:
            return None
        return RequestError(p.BUSY, f"Too many connections: {what}", retry_after_ms=1000)

    def _make_room_for(self, newcomer: Session, newcomer_count: int) -> bool:
        """All connections are taken: close the longest-idle one of the uid holding
        the most, if that uid holds more than the newcomer's. Idle connections
        of a few uids must not lock every other uid out."""
        by_uid: dict = {}
        for other in self.dispatcher.sessions.values():
            by_uid.setdefault(other.peer.uid, []).append(other)
        uid, theirs = max(by_uid.items(), key=lambda item: len(item[1]))
        idle = [other for other in theirs if other.is_idle()]
        if len(theirs) <= newcomer_count + 1 or not idle:
            return False
        victim = min(idle, key=lambda other: other.last_active)
        log.info("closed an idle connection of uid %s (it holds %d) to admit uid %s: max_connections "
                 "(%d) reached", uid, len(theirs), newcomer.peer.uid, self.dispatcher.config.max_connections,
                 extra=victim.peer.log_fields())
        victim.close()
        self.dispatcher.sessions.pop(victim.id, None)
        return True

    @staticmethod
    async def _refuse(connection: Session, error: RequestError) -> None:
        try:
            await asyncio.wait_for(connection.send(p.error_response(None, error)), 1.0)
        except (OSError, asyncio.TimeoutError):
            pass
        connection.close()
