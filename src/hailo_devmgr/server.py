"""The socket side: listeners, connections, and what each action does.

A thin asyncio wrapper around protocol.py. Control-plane actions (ping,
status, device_status) are answered here at once from snapshots, never
behind device work. Device actions are validated and their tensors
decoded in a worker thread (actions.py), then handed to the device
thread; the event loop only waits.

One request at a time per connection, in order (v1 clients send one and
wait); many connections at once, each reading and writing only its own
frames, so no response can reach the wrong client.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass

from . import actions, simulate
from . import protocol as p
from ._version import __version__
from .protocol import RequestError
from .tensors import encode_results

log = logging.getLogger(__name__)

# Bodies larger than this are parsed in a worker thread, not on the loop.
INLINE_PARSE_BYTES = 256 * 1024


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection (SO_PEERCRED)."""

    pid: int | None
    uid: int | None
    gid: int | None

    @classmethod
    def of(cls, sock: socket.socket | None) -> "Peer":
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return cls(*struct.unpack("3i", creds))
        except (OSError, AttributeError):
            return cls(None, None, None)

    def log_fields(self) -> dict:
        return {"CLIENT_PID": self.pid, "CLIENT_UID": self.uid}


class ByteBudget:
    """Bounds the request bytes held in memory across all connections.

    A reader waits for room before reading a body, so many large messages
    slow their senders down instead of exhausting the unit's MemoryMax.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = asyncio.Condition()

    async def acquire(self, size: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + size <= self.limit or self.used == 0)
            self.used += size

    async def release(self, size: int) -> None:
        async with self._cond:
            self.used -= size
            self._cond.notify_all()


# ------------------------------------------------------------ listener

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
            request = None
            try:
                header = conn.recv(p.HEADER_SIZE, socket.MSG_WAITALL)
                length = p.parse_length(header, 64 * 1024)
                message = p.decode_body(conn.recv(length, socket.MSG_WAITALL))
                request_id, has_id = p.request_id_of(message)
                request = p.Request("", message, request_id, has_id)
            except (OSError, RequestError, struct.error):
                pass  # answer anyway, without a request_id
            try:
                conn.sendall(p.encode_frame(p.error_response(request, error)))
            except OSError:
                pass


# ------------------------------------------------------------ server

class Server:
    def __init__(self, config, device, runtime, registry, socket_path: str):
        self.config = config
        self.device = device
        self.runtime = runtime
        self.registry = registry
        self.socket_path = socket_path
        self.started_mono = time.monotonic()
        self.budget = ByteBudget(config.max_pending_bytes)
        self.last_error: str | None = None
        self.shutting_down = False
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()

    def apply_config(self, config) -> None:
        """Take the reloadable parts of a new config (SIGHUP)."""
        self.config = config
        self.budget.limit = config.max_pending_bytes

    async def start(self, listener: socket.socket) -> None:
        # Report the path we really listen on (systemd's, when activated).
        bound = listener.getsockname()
        if isinstance(bound, str) and bound:
            self.socket_path = bound
        self._server = await asyncio.start_unix_server(self._connection, sock=listener)

    def stop_accepting(self) -> None:
        # Not wait_closed(): from Python 3.12 it also waits for every open
        # connection, and those are answered and closed later in shutdown.
        if self._server is not None:
            self._server.close()

    async def close_connections(self, grace_s: float) -> None:
        """Let answers already on their way go out, then cut the rest."""
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=grace_s)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- connections ----------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        peer = Peer.of(writer.get_extra_info("socket"))
        try:
            while await self._serve_one(reader, writer, peer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing of theirs is left to answer
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve_one(self, reader, writer, peer: Peer) -> bool:
        """Read one frame, answer it. False when the connection must end."""
        try:
            header = await reader.readexactly(p.HEADER_SIZE)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                log.warning("client sent a truncated frame header and closed", extra=peer.log_fields())
            return False
        try:
            length = p.parse_length(header, self.config.max_message_bytes)
        except RequestError as error:
            log.warning("refused a frame: %s", error.message, extra={**peer.log_fields(), "CODE": error.code})
            await self._send(writer, p.error_response(None, error))
            return False
        await self.budget.acquire(length)
        try:
            try:
                body = await reader.readexactly(length)
            except asyncio.IncompleteReadError:
                log.warning("client closed in the middle of a %d-byte frame", length, extra=peer.log_fields())
                return False
            response = await self._answer(body, peer)
            await self._send(writer, response)
        finally:
            await self.budget.release(length)
        return True

    async def _send(self, writer: asyncio.StreamWriter, response: dict) -> None:
        frame = p.encode_frame(response)
        writer.write(frame)
        await writer.drain()

    # -- requests -------------------------------------------------------------

    async def _answer(self, body: bytes, peer: Peer) -> dict:
        try:
            if len(body) > INLINE_PARSE_BYTES:
                message = await asyncio.to_thread(p.decode_body, body)
            else:
                message = p.decode_body(body)
        except RequestError as error:
            return self._error(None, None, error, peer)
        return await self.handle_message(message, peer)

    async def handle_message(self, message: dict, peer: Peer = Peer(None, None, None)) -> dict:
        """Answer one decoded request (also used for pre-warming pins)."""
        request = None
        try:
            request = p.parse_request(message)
            payload = await self._dispatch(request, peer)
            return p.ok_response(request, payload)
        except RequestError as error:
            return self._error(request, message, error, peer)
        except Exception:
            log.exception("internal error answering a request", extra=peer.log_fields())
            error = RequestError(p.INTERNAL_ERROR, "Internal error in the device manager (see its log)")
            return self._error(request, message, error, peer)

    def _error(self, request, message, error: RequestError, peer: Peer) -> dict:
        if request is None:
            request_id, has_id = p.request_id_of(message)
            request = p.Request(action="", body={}, request_id=request_id, has_request_id=has_id)
        fields = {**self._log_fields(request, peer), "CODE": error.code}
        if error.code not in (p.BAD_REQUEST, p.UNKNOWN_ACTION):
            self.last_error = error.message
        log.info("%s refused: %s", request.action or "request", error.message, extra=fields)
        return p.error_response(request, error)

    async def _dispatch(self, request: p.Request, peer: Peer) -> dict:
        if request.action in ("ping", "status"):
            return self.status_payload()
        if request.action == "device_status":
            return self.device_status_payload()
        if request.action == "simulate":
            return simulate.apply(request.body, self.runtime.backend, peer.uid)
        if self.shutting_down:
            raise RequestError(p.SHUTTING_DOWN, "The device manager is shutting down")
        prepared = await asyncio.to_thread(actions.prepare, request, self.config)
        if request.action != "unload_model":
            # The thermal guard, from the device thread's latest reading
            # (checked again when the job starts on the device thread).
            refusal = self.runtime.thermal_refusal()
            if refusal is not None:
                raise refusal
        prepared.log_fields = self._log_fields(request, peer)
        job, label, budget_s = actions.device_job(prepared, self.registry, self.config.watchdog)
        future = self.device.submit(job, label=label, budget_s=budget_s)
        result = await asyncio.wrap_future(future)
        if request.action == "infer":
            result = await self._infer_payload(result)
        return result

    @staticmethod
    def _log_fields(request: p.Request, peer: Peer) -> dict:
        fields = peer.log_fields()
        if request.has_request_id:
            fields["REQUEST_ID"] = request.request_id
        return fields

    async def _infer_payload(self, outcome) -> dict:
        result, run_ms = outcome
        encoded = await asyncio.to_thread(encode_results, result)
        return {"result": encoded, "inference_time_ms": round(run_ms, 3)}

    # -- control plane (event loop, snapshots only) ----------------------------

    def uptime(self) -> float:
        return round(time.monotonic() - self.started_mono, 3)

    def status_payload(self) -> dict:
        reason, model, at = self.registry.last_capacity_event
        return {
            "device_id": self.runtime.identity.device_id,
            "loaded_models": list(self.registry.snapshot),
            "uptime_seconds": self.uptime(),
            "socket_path": self.socket_path,
            "queue_depth": self.device.queue_depth,
            "total_lru_evictions": self.registry.total_evictions,
            "runtime_broken_reason": self.runtime.broken_reason,
            "last_capacity_event_reason": reason,
            "last_capacity_event_model": model,
            "last_capacity_event_at": at,
            # Additions beyond v1:
            "version": __version__,
            "backend": self.runtime.backend.name,
            "device_busy_with": self.device.busy_with,
            "last_error": self.last_error,
            "throttled": self.runtime.throttled,
            "runtime_faults": self.runtime.runtime_faults,
            "runtime_recoveries": self.runtime.runtime_recoveries,
        }

    def device_status_payload(self) -> dict:
        identity = self.runtime.identity
        networks = [
            {"name": os.path.splitext(os.path.basename(model["model_path"]))[0], **model}
            for model in self.registry.snapshot
        ]
        return {
            "device": {
                "device_id": identity.device_id,
                "architecture": identity.architecture,
                "fw_version": identity.fw_version,
                "temperature_celsius": self.runtime.temperature_c,
            },
            "networks": {
                "status": "ok" if self.runtime.vdevice is not None else "unavailable",
                "source": "device-manager",
                "network_count": len(networks),
                "networks": networks,
            },
            "uptime_seconds": self.uptime(),
            "queue_depth": self.device.queue_depth,
            "backend": self.runtime.backend.name,
            "runtime_broken_reason": self.runtime.broken_reason,
            "runtime_faults": self.runtime.runtime_faults,
            "runtime_recoveries": self.runtime.runtime_recoveries,
            "thermal": {
                "throttled": self.runtime.throttled,
                "limit_c": self.runtime.thermal.limit_c,
                "resume_c": self.runtime.thermal.resume_c,
                "temperature_celsius": self.runtime.temperature_c,
                "read_at": self.runtime.temperature_read_at,
            },
        }

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        parts = [f"{len(self.registry.snapshot)} model(s) loaded", f"queue {self.device.queue_depth}"]
        if self.runtime.broken_reason:
            parts.append(f"device unavailable: {self.runtime.broken_reason}")
        elif self.runtime.throttled:
            celsius = self.runtime.temperature_c
            parts.append(f"overheated ({celsius:g} °C): refusing new work" if celsius is not None
                         else "overheated: refusing new work")
        elif self.last_error:
            parts.append(f"last error: {self.last_error}")
        return f"{self.runtime.backend.name} backend, " + ", ".join(parts)
