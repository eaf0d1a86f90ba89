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
from dataclasses import replace

import numpy as np

from . import actions, limits, scheduler, simulate, workers
from ..wire import references, shm, transport
from ..wire import protocol as p
from .._version import __version__
from .connection import Connection, Frame, Peer
from .metrics import Metrics
from ..wire.protocol import RequestError
from ..wire.tensors import encode_results

log = logging.getLogger(__name__)



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
        # What clients' requests hold while read and until answered, bounded in all and per uid.
        self.pending_bytes = limits.Pool("request bytes", config.max_pending_bytes, _bytes_per_uid(config))
        self.pending_fds = limits.Pool("request descriptors", config.max_pending_fds,
                                       config.max_pending_fds_per_uid)
        # Answers made and not yet taken by their client (also in pending_bytes):
        # past a uid's share, that uid gets no more device work run.
        self.unsent_answers = limits.Pool("bytes of unread answers", UNBOUNDED, _bytes_per_uid(config))
        # Registered shared memory: per connection in shm.py; here per uid (the
        # daemon's page tables, and the RSS the kernel's OOM killer reads).
        self.registered_bytes = limits.Pool("registered shared-memory bytes", *_registered_bounds(config))
        # Per uid only: the queue's fair share rule (scheduler.py) governs all uids together.
        self.device_jobs = limits.Pool("device requests", UNBOUNDED, _jobs_per_uid(config))
        # Idle attachment buffers kept for reuse (not counted in the budget).
        self.buffers = transport.BufferPool(min(64 * 1024 * 1024, config.max_pending_bytes // 4))
        self.last_error: str | None = None
        self.last_error_code: str | None = None   # what systemd's STATUS= shows of it
        self.metrics = Metrics()
        self.worker_pool = workers.FairPool()   # request work, shared out by uid
        self.shutting_down = False
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._starting: set[asyncio.Task] = set()   # every connection task, admitted or not
        self._connections: set[asyncio.Task] = set()
        self.clients: dict[int, Connection] = {}   # by connection id, for status and limits

    def apply_config(self, config) -> None:
        """Take the reloadable parts of a new config (SIGHUP)."""
        self.config = config
        self.pending_bytes.set_limits(config.max_pending_bytes, _bytes_per_uid(config))
        self.pending_fds.set_limits(config.max_pending_fds, config.max_pending_fds_per_uid)
        self.unsent_answers.set_limits(UNBOUNDED, _bytes_per_uid(config))
        self.registered_bytes.set_limits(*_registered_bounds(config))
        self.device_jobs.set_limits(UNBOUNDED, _jobs_per_uid(config))

    async def start(self, listener: socket.socket) -> None:
        # Report the path we really listen on (systemd's, when activated).
        bound = listener.getsockname()
        if isinstance(bound, str) and bound:
            self.socket_path = bound
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.ensure_future(self._accept_loop(listener))

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept connections; each gets a raw socket (see transport.SocketStream)."""
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
            task.add_done_callback(self._starting.discard)

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

    # -- connections ----------------------------------------------------------

    async def _connection(self, sock: socket.socket) -> None:
        connection = Connection(self, sock)
        refusal = self._over_connection_limit(connection)
        if refusal is not None:
            log.warning("refused a connection: %s", refusal.message,
                        extra={**connection.peer.log_fields(), "CODE": refusal.code})
            await self._refuse(connection, refusal)
            return
        connection.default_priority = self._configured_priority(connection)
        task = asyncio.current_task()
        self._connections.add(task)
        self.clients[connection.id] = connection
        try:
            await connection.run()
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            self.clients.pop(connection.id, None)

    def _over_connection_limit(self, connection: Connection) -> RequestError | None:
        config = self.config
        same_uid = sum(1 for other in self.clients.values() if other.peer.uid == connection.peer.uid)
        if same_uid >= config.max_connections_per_uid:
            what = f"uid {connection.peer.uid} has {same_uid} connections (max_connections_per_uid)"
        elif len(self.clients) >= config.max_connections and not self._make_room_for(connection, same_uid):
            what = f"the daemon has {len(self.clients)} connections (max_connections)"
        else:
            return None
        return RequestError(p.BUSY, f"Too many connections: {what}", retry_after_ms=1000)

    def _make_room_for(self, newcomer: Connection, newcomer_count: int) -> bool:
        """All connections are taken: close the longest-idle one of the uid holding
        the most, if that uid holds more than the newcomer's. Idle connections
        of a few uids must not lock every other uid out."""
        by_uid: dict = {}
        for other in self.clients.values():
            by_uid.setdefault(other.peer.uid, []).append(other)
        uid, theirs = max(by_uid.items(), key=lambda item: len(item[1]))
        idle = [other for other in theirs if other.is_idle()]
        if len(theirs) <= newcomer_count + 1 or not idle:
            return False
        victim = min(idle, key=lambda other: other.last_active)
        log.info("closed an idle connection of uid %s (it holds %d) to admit uid %s: max_connections "
                 "(%d) reached", uid, len(theirs), newcomer.peer.uid, self.config.max_connections,
                 extra=victim.peer.log_fields())
        victim.close()
        self.clients.pop(victim.id, None)
        return True

    @staticmethod
    async def _refuse(connection: Connection, error: RequestError) -> None:
        try:
            await asyncio.wait_for(connection.send(p.error_response(None, error)), 1.0)
        except (OSError, asyncio.TimeoutError):
            pass
        connection.close()

    def client_gone(self, connection: Connection) -> None:
        """Drop the queued work of a connection that closed (it never runs)."""
        dropped = self.device.queue.drop_owner(connection.id)
        if dropped:
            log.info("client closed the connection: %d queued request(s) dropped", dropped,
                     extra=connection.peer.log_fields())

    def is_admin(self, peer: Peer) -> bool:
        """Root, the daemon's own user, and the uids/groups in config `admin`."""
        if peer.uid is None:
            return False
        if peer.uid in (0, os.getuid()) or peer.uid in self.config.admin.uids:
            return True
        return bool(self.config.admin.groups) and bool(set(self.config.admin.groups) & peer.groups())

    def _configured_priority(self, connection: Connection) -> str | None:
        for rule in self.config.scheduling.client_priorities:
            if rule.get("uid") == connection.peer.uid or (
                    connection.unit is not None and rule.get("unit") == connection.unit):
                return rule["priority"]
        return None

    # -- requests -------------------------------------------------------------

    async def answer(self, frame: Frame, connection: Connection) -> dict:
        message = frame.message
        try:
            if message is None:
                message = await connection.decode(frame)
            if frame.refusal is not None:
                raise frame.refusal
            if frame.fds or frame.fds_truncated or "fds" in message:
                transport.check_fds(message, len(frame.fds), frame.fds_truncated)
        except RequestError as error:
            return self.error_answer(None, message, error, connection)
        if connection.protocol >= 2:
            frame.blocks = references.Blocks(frame.attachments, frame.fds, connection.shm_buffers)
        return await self.handle_message(message, connection, frame.blocks)

    async def handle_message(self, message: dict, connection: Connection | None = None,
                             blocks: references.Blocks | None = None) -> dict:
        """Answer one decoded request (also used, without a connection, to pre-warm pins).

        ``blocks``: the attachments and descriptors of a v2 frame, which
        tensor references in ``input_data`` point into."""
        request = None
        try:
            request = p.parse_request(message)
            payload = await self._dispatch(request, connection, blocks)
            return p.ok_response(request, payload)
        except RequestError as error:
            return self.error_answer(request, message, error, connection)
        except Exception:
            log.exception("internal error answering a request", extra=_peer(connection).log_fields())
            error = RequestError(p.INTERNAL_ERROR, "Internal error in the device manager (see its log)")
            return self.error_answer(request, message, error, connection)

    def error_answer(self, request, message, error: RequestError, connection: Connection | None) -> dict:
        if request is None:
            request_id, has_id = p.request_id_of(message)
            request = p.Request(action="", body={}, request_id=request_id, has_request_id=has_id)
        fields = {**self._log_fields(request, connection), "CODE": error.code}
        text = p.clipped(error.message, p.MAX_ERROR_CHARS)  # as error_response answers it
        if error.code not in (p.BAD_REQUEST, p.UNKNOWN_ACTION, p.CANCELLED):
            self.last_error, self.last_error_code = text, error.code
        log.info("%s refused: %s", request.action or "request", text, extra=fields)
        return p.error_response(request, error)

    async def _dispatch(self, request: p.Request, connection: Connection | None,
                        blocks: references.Blocks | None = None) -> dict:
        action = request.action
        if action in ("ping", "status"):
            return self.status_payload()
        if action == "device_status":
            return self.device_status_payload()
        if action == "metrics":
            return {"metrics": self.metrics.snapshot()}
        if action == "hello":
            return self._hello(request, connection)
        if action == "cancel":
            return self._cancel(request, connection)
        if action in ("register_buffer", "unregister_buffer"):
            return await self._buffer_request(request, connection, blocks)
        if action == "simulate":
            return simulate.apply(request.body, self.runtime.backend, _peer(connection).uid)
        if self.shutting_down:
            raise p.shutting_down()
        return await self._device_action(request, connection, blocks)

    async def _device_action(self, request: p.Request, connection: Connection | None,
                             blocks: references.Blocks | None = None) -> dict:
        received = time.monotonic()  # queue order is arrival order, whatever validation takes
        tracked = connection is not None and request.has_request_id
        if tracked and request.request_id in connection.inflight:
            # Answers (and cancel) find a request by its request_id: two at once would be ambiguous.
            raise RequestError(p.BAD_REQUEST, f"request_id {request.request_id!r} is already in use by a "
                                              f"request in flight on this connection")
        if tracked:
            connection.inflight[request.request_id] = None  # known, not queued yet (for cancel)
        try:
            return await self._run_device_action(request, connection, received, tracked, blocks)
        finally:
            if tracked:
                connection.inflight.pop(request.request_id, None)
                connection.cancel_requested.discard(request.request_id)

    async def _run_device_action(self, request, connection, received: float, tracked: bool,
                                 blocks: references.Blocks | None = None) -> dict:
        if workers.is_small(request.body) and not (blocks is not None and blocks.fds):
            # A few paths to check and at most a few KiB of tensors, nothing to
            # map: quicker here than a worker's hand-over, and never behind other
            # clients' validations.
            prepared = self._prepare(request, blocks)
        else:
            prepared = await self.worker_pool.run(_work_key(connection), self._prepare, request, blocks)
        if request.action != "unload_model":
            # The thermal guard, from the device thread's latest reading
            # (checked again when the job starts on the device thread).
            refusal = self.runtime.thermal_refusal()
            if refusal is not None:
                raise refusal
        prepared.log_fields = self._log_fields(request, connection)
        prepared.admin = connection is None or self.is_admin(connection.peer)
        if prepared.scope and connection is not None and self.runtime.backend.name == "simulated":
            # Test hooks that hold the simulated device (a hang outlasts every
            # timeout and the watchdog): the simulate action's rule.
            simulate.authorize(self.runtime.backend.name, connection.peer.uid)
        fn, label, budget_s = actions.device_job(prepared, self.registry, self.config.watchdog)
        await self._answers_taken(connection)
        if tracked and request.request_id in connection.cancel_requested:
            raise scheduler.cancelled_error()  # cancelled while it was being validated
        uid = _peer(connection).uid
        self._take_job_slot(uid)
        try:
            job = self.device.submit(fn, label=label, budget_s=budget_s, enqueued_at=received,
                                     **self._job_fields(request, prepared, connection))
            if tracked:
                connection.inflight[request.request_id] = job
            try:
                result = await self._await_job(job)
            except RequestError as error:
                self.metrics.observe(request.action, prepared.model_type, job, error.code)
                raise
            finally:
                if job.future.done():
                    # The device thread keeps its last job until the next one: let go of the
                    # inputs now, so their attachment buffers can be reused (BufferPool).
                    prepared.inputs = None
            self.metrics.observe(request.action, prepared.model_type, job, None)
            if request.action == "infer":
                result = await self._infer_payload(result, connection)
            return result
        finally:
            # From here the answer counts in the uid's request bytes (Connection.send).
            self.device_jobs.give(uid, 1)

    def _take_job_slot(self, uid) -> None:
        """A uid's device jobs from submission until their answer is made:
        queued, running, and done but not yet encoded. The queue's own bound
        counts only those waiting; with a fast device, a uid that never reads
        could otherwise have any number of answers made before one of them
        was counted against its share."""
        refusal = self.device_jobs.take_now(uid, 1)
        if refusal is not None:
            raise RequestError(p.BUSY, f"Too many device requests at once ({refusal})", retry_after_ms=100)

    async def _answers_taken(self, connection: Connection | None) -> None:
        """Wait while the client's uid holds more than its share of request bytes
        and unread answers: a client that asks and never reads gets no more of
        its work run, so its answers cannot pile up past its share (and what
        its queue held already). Bounded like any wait: then busy."""
        if connection is None:
            return
        deadline = asyncio.get_running_loop().time() + self.config.frame_timeout_s
        try:
            await self.unsent_answers.take(connection.peer.uid, 0, deadline)
        except limits.PoolTimeout as full:
            raise RequestError(p.BUSY, f"This client's answers are not being read ({full.reason})",
                               retry_after_ms=1000) from None

    def _prepare(self, request: p.Request, blocks: references.Blocks | None):
        """actions.prepare, after v2 tensor references in input_data are resolved
        (worker thread, or the event loop for a small request without input_data).
        The references are bounded in number and bytes before anything is mapped.
        The frame's descriptors are closed here: mappings stay valid for as long
        as the arrays on them live."""
        try:
            if blocks is not None and request.action == "infer" and \
                    references.has_references(request.body.get("input_data")):
                resolved = references.resolve(request.body["input_data"], blocks,
                                             self.config.max_tensor_elements, "input_data",
                                             max_count=references.MAX_REFERENCES,
                                             max_bytes=references.MAX_REFERENCED_BYTES)
                request = replace(request, body={**request.body, "input_data": resolved})
            return actions.prepare(request, self.config)
        finally:
            if blocks is not None:
                blocks.close()

    def _job_fields(self, request: p.Request, prepared, connection: Connection | None) -> dict:
        priority = prepared.priority or (connection.default_priority if connection else None) \
            or scheduler.DEFAULT_PRIORITY
        return {
            "priority": scheduler.PRIORITIES.index(priority),
            "client": connection.client_key if connection else "daemon",
            "owner": connection.id if connection else None,
            "request_id": request.request_id if request.has_request_id else None,
            "deadline": prepared.deadline,
            "model_key": prepared.spec.key if prepared.spec else None,
        }

    async def _await_job(self, job):
        """The job's result; past its deadline, a job that has not started is
        answered ``timeout`` and never runs (one that has started finishes)."""
        waiting = asyncio.wrap_future(job.future)
        if job.deadline is None:
            return await waiting
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), max(0.0, job.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.device.queue.remove(job, RequestError(p.TIMEOUT, "Timed out before the device could start it"))
            return await waiting

    def _hello(self, request: p.Request, connection: Connection | None) -> dict:
        wanted = p.optional_number(request.body, "protocol", 1, minimum=1, integer=True)
        label = p.optional_str(request.body, "client", None)
        if label is not None and len(label) > 128:
            raise RequestError(p.BAD_REQUEST, "client must be at most 128 characters")
        accepts = request.body.get("features", [])
        if not isinstance(accepts, list) or not all(isinstance(item, str) for item in accepts):
            raise RequestError(p.BAD_REQUEST, "features must be a list of feature names")
        agreed = min(wanted, p.PROTOCOL_MAX)
        # Results come back as attachments (and large ones as memfds) only when asked for.
        binary = agreed >= 2 and "attachments" in accepts
        shm_results = binary and "shm" in accepts
        if connection is not None:
            connection.protocol = agreed
            connection.client_label = label
            connection.binary_results, connection.shm_results = binary, shm_results
        limits = self.config.scheduling
        answer = {
            "protocol": agreed,
            "version": __version__,
            "features": self._features() if agreed >= 2 else [],
            "priorities": list(scheduler.PRIORITIES),
            "limits": {
                "max_message_bytes": self.config.max_message_bytes,
                "max_tensor_elements": self.config.max_tensor_elements,
                "max_queue": limits.max_queue,
                "max_queue_per_client": limits.max_queue_per_client,
                "max_inflight_per_connection": limits.max_inflight_per_connection,
                "max_attachments": transport.MAX_ATTACHMENTS,
                "max_fds": transport.MAX_FDS,
                "shm_result_min_bytes": self.config.shm_result_min_bytes,
                "max_shm_buffers": shm.MAX_BUFFERS,
                "shm_buffer_max_bytes": self.config.shm_buffer_max_bytes,
            },
        }
        if agreed >= 2:
            answer["transport"] = {"version": transport.TRANSPORT_VERSION,
                                   "results": "shm" if shm_results else "attachments" if binary else "base64"}
        return answer

    def _features(self) -> list[str]:
        return [name for name in p.FEATURES_V2 if name != "shm_buffers" or self.config.shm_buffer_max_bytes]

    async def _buffer_request(self, request: p.Request, connection: Connection | None,
                              blocks: references.Blocks | None) -> dict:
        """register_buffer / unregister_buffer, with the uid's registered bytes
        counted here (the mapping itself in a worker: it populates page tables)."""
        # What the uid's pool holds for this connection is counted here, on the
        # event loop (connection.shm_charged), whatever the worker was doing when
        # the connection ended: connection_closed gives back exactly that.
        uid = _peer(connection).uid
        if connection is None:
            raise RequestError(p.BAD_REQUEST, f"{request.action} needs protocol 2 (send hello first)")
        if request.action == "unregister_buffer":
            answer = await self.worker_pool.run(_work_key(connection), self._buffer_action, request, connection,
                                                blocks)
            self._uncharge_registered(connection, answer.pop("_size"))
            return answer
        # Reserved before the worker maps it (mapping populates its pages): many
        # registrations at once must not all be mapped to be refused afterwards.
        size = _memfd_size(blocks)
        if connection.shm_buffers.total_bytes + size > self.config.shm_buffer_max_bytes:
            size = 0  # over the connection's own bound: the worker refuses it, in those words
        refusal = self.registered_bytes.take_now(uid, size)
        if refusal is not None:
            # bad_request: the client library then sends that array in a one-shot memfd.
            raise RequestError(p.BAD_REQUEST, f"Too much registered shared memory: {refusal}")
        connection.shm_charged += size
        try:
            answer = await self.worker_pool.run(_work_key(connection), self._buffer_action, request, connection,
                                                blocks)
        except RequestError:
            self._uncharge_registered(connection, size)  # refused: nothing registered
            raise
        if answer["size"] != size:  # resized before it was sealed: count what was mapped
            self._uncharge_registered(connection, size)
            self.registered_bytes.charge(uid, answer["size"])
            connection.shm_charged += answer["size"]
        return answer

    def _uncharge_registered(self, connection: Connection, size: int) -> None:
        self.registered_bytes.give(connection.peer.uid, size)
        connection.shm_charged -= size

    def connection_closed(self, connection: Connection) -> None:
        """Give back what a closed connection's registered buffers counted."""
        self.registered_bytes.give(connection.peer.uid, connection.shm_charged)
        connection.shm_charged = 0

    def _buffer_action(self, request: p.Request, connection: Connection | None,
                       blocks: references.Blocks | None) -> dict:
        """register_buffer (one memfd with the frame) and unregister_buffer {buffer}."""
        if connection is None or connection.protocol < 2 or blocks is None:
            raise RequestError(p.BAD_REQUEST, f"{request.action} needs protocol 2 (send hello first)")
        if request.action == "unregister_buffer":
            if "buffer" not in request.body:
                raise RequestError(p.BAD_REQUEST, "unregister_buffer needs buffer: the id register_buffer gave")
            size = connection.shm_buffers.unregister(request.body["buffer"])
            return {"buffer": request.body["buffer"], "unregistered": True, "_size": size}
        if not self.config.shm_buffer_max_bytes:
            raise RequestError(p.BAD_REQUEST, "Registered buffers are turned off here (shm_buffer_max_bytes: 0)")
        if len(blocks.fds) != 1:
            raise RequestError(p.BAD_REQUEST, f"register_buffer needs exactly one memfd with the frame "
                                              f"(fds: 1), got {len(blocks.fds)}")
        buffer_id, size = blocks.using_fd(0, lambda fd: connection.shm_buffers.register(fd, "buffer"), "")
        return {"buffer": buffer_id, "size": size}

    def _cancel(self, request: p.Request, connection: Connection | None) -> dict:
        """Cancel a request of this same connection, by its request_id."""
        body = request.body
        if "target" in body:
            target, valid = p.request_id_of({"request_id": body["target"]})
            if not valid:
                raise RequestError(p.BAD_REQUEST, "target must be the request_id (string or number) to cancel")
        elif request.has_request_id:
            target = request.request_id
        else:
            raise RequestError(p.BAD_REQUEST, "cancel needs target: the request_id to cancel")
        known = connection is not None and target in connection.inflight
        job = connection.inflight.get(target) if known else None
        if known and job is None:
            connection.cancel_requested.add(target)  # still being validated: it will not be queued
            state = "cancelled"
        elif job is not None and self.device.queue.remove(job, scheduler.cancelled_error()):
            state = "cancelled"
        elif job is not None:
            state = "running" if job.started_at else "finishing"
        else:
            state = "unknown"
        return {"action": "cancel", "target": target, "cancelled": state == "cancelled", "state": state}

    @staticmethod
    def _log_fields(request: p.Request, connection: Connection | None) -> dict:
        fields = _peer(connection).log_fields()
        if request.has_request_id:
            fields["REQUEST_ID"] = request.request_id
        if connection is not None and connection.client_label:
            fields["CLIENT"] = connection.client_label
        return fields

    async def _infer_payload(self, outcome, connection: Connection | None = None) -> dict:
        result, run_ms = outcome
        if connection is not None and connection.binary_results:
            # ndarrays stay: Connection.send writes them as attachments or memfds.
            return {"result": result, "inference_time_ms": round(run_ms, 3)}
        if _is_small_result(result):
            encoded = encode_results(result)  # base64 of a few KiB: cheaper than a hand-over
        else:
            encoded = await self.worker_pool.run(_work_key(connection), encode_results, result)
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
            "queue_by_class": self.device.queue.depth_by_class(),
            "queue_by_client": self.device.queue.depth_by_client(),
            "connections": len(self.clients),
            "clients": [client.describe() for client in self.clients.values()],
            "runtime_broken_reason": self.runtime.broken_reason,
            "last_capacity_event_reason": reason,
            "last_capacity_event_model": model,
            "last_capacity_event_at": at,
            # Additions beyond v1:
            "version": __version__,
            "backend": self.runtime.backend.name,
            "hailort_version": self.runtime.backend.hailort_version,
            "genai_unavailable_reason": self.runtime.backend.genai_missing,
            "device_busy_with": self.device.busy_with,
            "last_error": self.last_error,
            "throttled": self.runtime.throttled,
            "runtime_faults": self.runtime.runtime_faults,
            "runtime_recoveries": self.runtime.runtime_recoveries,
            "held_by_clients": {"request_bytes": self.pending_bytes.used, "descriptors": self.pending_fds.used,
                                "registered_shm_bytes": self.registered_bytes.used},
        }

    def device_status_payload(self) -> dict:
        identity = self.runtime.identity
        # As the earlier daemon: name is the file name, source "device_manager".
        networks = [{"name": os.path.basename(model["model_path"]), **model} for model in self.registry.snapshot]
        device = {
            "device_id": identity.device_id,
            "architecture": identity.architecture,
            "fw_version": identity.fw_version,
        }
        if self.runtime.temperature_c is not None:
            # Left out when unknown: the earlier daemon's web portal fails on a null.
            device["temperature_celsius"] = self.runtime.temperature_c
        return {
            "device": device,
            "networks": {
                "status": "ok" if self.runtime.vdevice is not None else "unavailable",
                "source": "device_manager",
                "network_count": len(networks),
                "networks": networks,
            },
            "uptime_seconds": self.uptime(),
            "queue_depth": self.device.queue_depth,
            "backend": self.runtime.backend.name,
            "hailort_version": self.runtime.backend.hailort_version,
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
        elif self.last_error_code:
            # The code, not the text: the text may quote a client's values (status has it).
            parts.append(f"last error: {self.last_error_code}")
        return f"{self.runtime.backend.name} backend, " + ", ".join(parts)


def _memfd_size(blocks: references.Blocks | None) -> int:
    """The size of the one descriptor a register_buffer frame carries (0 when
    it carries none or several: the worker then refuses it)."""
    if blocks is None or len(blocks.fds) != 1:
        return 0
    try:
        return os.fstat(blocks.fds[0]).st_size
    except OSError:
        return 0


def _jobs_per_uid(config) -> int:
    """Those waiting (the queue's own bound), one running and one being answered."""
    return config.scheduling.max_queue_per_client + 2


def _registered_bounds(config) -> tuple[int, int]:
    """(all uids, one uid): one uid may register what one connection may, all
    together four times that."""
    return 4 * config.shm_buffer_max_bytes, config.shm_buffer_max_bytes


def _bytes_per_uid(config) -> int:
    """A uid's share of request bytes, never below one whole message: a body is
    charged a chunk at a time, and its own earlier chunks count."""
    return max(config.max_pending_bytes_per_uid, config.max_message_bytes)


def _peer(connection: Connection | None) -> Peer:
    return connection.peer if connection is not None else Peer(None, None, None)


SMALL_RESULT_BYTES = 64 * 1024
UNBOUNDED = 1 << 62


def _is_small_result(result) -> bool:
    """At most SMALL_RESULT_BYTES of arrays, in a shallow structure (handlers'
    results are a dict of outputs, a list of segments, an array or text)."""
    total, pending = 0, [result]
    for _ in range(256):
        if not pending:
            return total <= SMALL_RESULT_BYTES
        item = pending.pop()
        if isinstance(item, np.ndarray):
            total += item.nbytes
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            if len(item) > 256:
                return False
            pending.extend(item)
        elif isinstance(item, str):
            total += len(item)
        if total > SMALL_RESULT_BYTES:
            return False
    return False


def _work_key(connection: Connection | None):
    """Whose turn a job waits for in the worker pool: the client's uid."""
    return connection.client_key if connection is not None else "daemon"
