"""The one entry point for requests: the table of actions.

A session (session.py) hands each frame it reads to ``answer``; the
daemon's own pinned models come in through ``preload``. Control-plane
actions (ping, status, device_status, metrics, hello, cancel) are answered
at once from snapshots (status.py), never behind device work. Device
actions (load_model, unload_model, infer) are validated (actions.py, inline
when small, else in the fair worker pool), admitted (admission.py: the
uid's pools and peer rules), queued (scheduler.py) and run on the device
thread; the event loop only waits.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import replace

from . import actions, jobs, lending, scheduler, simulate, status, streaming, workers
from .admission import Admission
from .settings import Settings
from .attachment_buffers import BufferPool
from .handoff import LoopHandoff
from .session import Session, Frame, Peer
from .metrics import Metrics
from .model_files import NotResolvedLately
from .._version import __version__
from ..wire import protocol as p
from ..wire import references, shm, transport
from ..wire.protocol import RequestError
from ..wire.tensors import encode_results

log = logging.getLogger(__name__)


class Dispatcher:
    """What every session shares: the device, the registry, the pools and the
    table of actions. Holds no session; each call names its own."""

    def __init__(self, settings: Settings, device, runtime, registry, socket_path: str):
        self.settings = settings
        self.device = device
        self.runtime = runtime
        self.registry = registry
        self.socket_path = socket_path
        self.started_mono = time.monotonic()
        self.admission = Admission(settings)
        self.admission.report_unread = device.queue.unread   # a uid whose answers go unread: its jobs wait
        # Idle attachment buffers kept for reuse (not counted in the budget).
        self.buffers = BufferPool(min(64 * 1024 * 1024, settings.config.max_pending_bytes // 4))
        self.last_error: str | None = None
        self.last_error_code: str | None = None   # what systemd's STATUS= shows of it
        self.metrics = Metrics()
        # Request work, shared out by uid; on any CPU (cpu_affinity.py).
        self.worker_pool = workers.FairPool(thread_init=runtime.placement.unpin_here)
        self.shutting_down = False
        self.sessions: dict[int, Session] = {}   # by connection id (the listener's), for status
        self.after_reclaim = lambda: None          # the daemon pre-loads its pins again
        self._table = self._actions()
        self._loop_handoff: LoopHandoff | None = None

    @property
    def config(self):
        """The running configuration (settings.py): read once per use, never kept."""
        return self.settings.config

    async def preload(self, model_type: str, model_path: str, model_params: dict) -> dict:
        """Load a pinned model as the daemon itself (no session): the answer a
        client would get, so failures read the same."""
        request = p.Request(action="load_model", body={"action": "load_model", "model_type": model_type,
                                                       "model_path": model_path, "model_params": model_params},
                            request_id=None, has_request_id=False)
        return await self._answer_request(request, request.body, None, None)

    def drop_queued_work(self, connection: Session) -> None:
        """A session is ending: its queued work never runs."""
        dropped = self.device.queue.drop_owner(connection.id)
        if dropped:
            log.info("client closed the connection: %d queued request(s) dropped", dropped,
                     extra=connection.peer.log_fields())

    def session_closed(self, connection: Session) -> None:
        """A session ended (its tasks finished): what its registered buffers
        counted goes back to its uid."""
        self.admission.registered_bytes.give(connection.peer.uid, connection.shm_charged)
        connection.shm_charged = 0

    async def answer(self, frame: Frame, connection: Session) -> dict:
        message, request, refusal = frame.message, None, None
        try:
            if message is None:
                message = await connection.decode(frame)
            if frame.refusal is not None:
                raise frame.refusal
            if frame.fds or frame.fds_truncated or "fds" in message:
                transport.check_fds(message, len(frame.fds), frame.fds_truncated)
            request = p.parse_request(message, len(frame.body))
        except RequestError as error:
            refusal = error
        # The request's turn among its uid's on the event loop (limits.Turns):
        # one uid's many connections cannot fill every pass of the loop.
        waiting = self.admission.turn(connection.peer.uid, request.action if request else None, connection.id)
        if waiting is not None:
            await waiting
        if refusal is not None:
            return self.error_answer(None, message, refusal, connection)
        if connection.protocol >= 2:
            # The attachments and descriptors of a v2 frame, which tensor
            # references in input_data point into.
            frame.blocks = references.Blocks(frame.attachments, frame.fds, connection.shm_buffers)
        return await self._answer_request(request, message, connection, frame.blocks)

    async def _answer_request(self, request: p.Request, message: dict, connection: Session | None,
                              blocks: references.Blocks | None) -> dict:
        try:
            run = self._table.get(request.action)
            if run is None:  # parse_request knows the same names: only a table out of step
                raise p.unknown_action(request.action)
            payload = await run(request, connection, blocks)
            return p.ok_response(request, payload)
        except RequestError as error:
            return self.error_answer(request, message, error, connection)
        except Exception:
            log.exception("internal error answering a request", extra=_peer(connection).log_fields())
            error = RequestError(p.INTERNAL_ERROR, "Internal error in the device manager (see its log)")
            return self.error_answer(request, message, error, connection)

    def error_answer(self, request, message, error: RequestError, connection: Session | None) -> dict:
        if request is None:
            request_id, has_id = p.request_id_of(message)
            request = p.Request(action="", body={}, request_id=request_id, has_request_id=has_id)
        fields = {**self._log_fields(request, connection), "CODE": error.code}
        text = p.clipped(error.message, p.MAX_ERROR_CHARS)  # as error_response answers it
        if error.code not in (p.BAD_REQUEST, p.UNKNOWN_ACTION, p.CANCELLED):
            self.last_error, self.last_error_code = text, error.code
        log.info("%s refused: %s", request.action or "request", text, extra=fields)
        response = p.error_response(request, error)
        if request.body.get("stream") is True and request.action == "infer":
            response.update(stream=True, done=True)   # ends the stream, as a final answer does
        return response

    def _actions(self) -> dict:
        """The table of actions: name -> coroutine(request, connection, blocks).
        Control-plane actions answer at once from snapshots; device actions
        go through admission and the scheduler to the device thread."""
        return {
            "ping": self._at_once(lambda request, connection: status.status_payload(self, connection)),
            "status": self._at_once(lambda request, connection: status.status_payload(self, connection)),
            "device_status": self._at_once(lambda request, connection: status.device_status_payload(self)),
            "metrics": self._at_once(lambda request, connection: {"metrics": self.metrics.snapshot()}),
            "hello": self._at_once(self._hello),
            "cancel": self._at_once(self._cancel),
            "simulate": self._at_once(lambda request, connection: simulate.apply(
                request.body, self.runtime.backend, _peer(connection).uid)),
            "register_buffer": self._buffer_request,
            "unregister_buffer": self._buffer_request,
            "lend": self._lend,
            "reclaim": self._reclaim,
            "load_model": self._device_action,
            "unload_model": self._device_action,
            "infer": self._device_action,
        }

    @staticmethod
    def _at_once(answer):
        async def run(request, connection, blocks):
            return answer(request, connection)
        return run

    async def _device_action(self, request: p.Request, connection: Session | None,
                             blocks: references.Blocks | None = None) -> dict:
        if self.shutting_down:
            raise p.shutting_down()
        if self.runtime.loan is not None:
            raise lending.lent_error(self.runtime.loan)
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
        small = 0 < request.size <= workers.INLINE_BODY_BYTES or workers.is_small(request.body)
        prepared = None
        if small and not (blocks is not None and blocks.fds):
            # Model paths known from lately and at most a few KiB of tensors,
            # nothing to map: quicker here than a worker's hand-over, and never
            # behind other clients' validations. A path to resolve costs a
            # system call per component, as many as the client writes: a worker's.
            try:
                prepared = self._prepare(request, blocks, lately_only=True)
            except NotResolvedLately:
                pass   # resolved by a worker, below
        if prepared is None:
            prepared = await self.worker_pool.run(_work_key(connection), self._prepare, request, blocks)
        budgets = self.config.watchdog
        if request.action != "unload_model":
            params = request.body.get("model_params")
            if params:   # a dict (prepare checked it): the backend's own knobs in it
                requester = connection.peer.uid if connection is not None else os.geteuid()
                prepared.backend_options = self.runtime.backend.request_options(
                    params, budgets.infer_budget_s, requester)
            # The thermal guard, from the device thread's latest reading
            # (checked again when the job starts on the device thread).
            refusal = self.runtime.thermal_refusal()
            if refusal is not None:
                raise refusal
        prepared.log_fields = self._log_fields(request, connection)
        prepared.admin = connection is None or self.admission.is_admin(connection.peer)
        tokens = self._open_stream(request, connection) if prepared.stream else None
        fn, label, budget_s = actions.device_job(prepared, self.registry, budgets,
                                                 tokens.on_token if tokens else None)
        if connection is not None and (unread := self.admission.answers_taken(connection.peer.uid)) is not None:
            await unread   # this uid's answers are not being read: its new work waits
        if tracked and request.request_id in connection.cancel_requested:
            raise scheduler.cancelled_error()  # cancelled while it was being validated
        uid = _peer(connection).uid
        self.admission.take_job_slot(uid)
        job = None
        try:
            job = self.device.submit(fn, label=label, budget_s=budget_s, enqueued_at=received,
                                     loop=self._handoff().loop,
                                     **self._job_fields(request, prepared, connection))
            if tracked:
                connection.inflight[request.request_id] = job
            try:
                waiting = self._await_job(job)
                result = await (self._streamed(tokens, request, connection, waiting) if tokens else waiting)
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
                result = self._infer_payload(result, connection, job.result_size)
                if not isinstance(result, dict):
                    result = await result   # encoded by a worker (a large result)
            if tokens:
                result.update(stream=True, done=True)
                if tokens.stop_reason is not None:
                    result["result"]["stop_reason"] = tokens.stop_reason
            return result
        finally:
            # From here the answer counts in the uid's request bytes (Session.send).
            self.admission.give_job_slot(uid)
            if job is not None:
                self.device.queue.answer_made(job)
            if tokens:
                connection.streams.pop(request.request_id, None)

    # -- lending the device (admins) -------------------------------------------

    def _admin_only(self, request: p.Request, connection: Session | None) -> None:
        if connection is None or not self.admission.is_admin(connection.peer):
            raise RequestError(p.FORBIDDEN, f"{request.action} is for admins (root, the daemon's user, or "
                                            f"config admin: uids and groups)")

    async def _lend(self, request: p.Request, connection: Session | None, blocks) -> dict:
        """Release every model and the device for another program (lending.py)."""
        self._admin_only(request, connection)
        loan = lending.Loan(lending.borrower(request.body), time.time())
        current = self.runtime.loan
        if current is not None and current.to != loan.to:
            raise lending.lent_error(current)
        if current is None:
            # After the running job; ahead of waiting ones, which then answer device_lent.
            await self._admin_job(request, lambda: self.runtime.lend(loan), f"lend the device to {loan.to}")
        current = self.runtime.loan
        log.warning("device lent to %s", current.to, extra=self._log_fields(request, connection))
        return {"lent_to": current.to, "lent_since": current.since}

    async def _reclaim(self, request: p.Request, connection: Session | None, blocks) -> dict:
        """End a loan: reopen the device and pre-load the pins again."""
        self._admin_only(request, connection)
        if self.runtime.loan is None:
            return {"reclaimed": False, "device_open": self.runtime.vdevice is not None,
                    "message": "The device was not lent"}
        opened = await self._admin_job(request, self.runtime.reclaim, "reclaim the device")
        self.after_reclaim()
        message = "Device reclaimed" if opened else (f"Device reclaimed; it cannot be opened yet "
                                                     f"({self.runtime.broken_reason}): retried on demand")
        return {"reclaimed": True, "device_open": bool(opened), "message": message}

    async def _admin_job(self, request: p.Request, fn, label: str):
        _, deadline = actions.scheduling_fields(request.body)   # timeout_ms: how long to wait for the device
        job = self.device.submit(fn, label=label, budget_s=self.config.watchdog.load_budget_s,
                                 client="daemon", priority=0, deadline=deadline)
        return await self._await_job(job)

    @staticmethod
    def _open_stream(request: p.Request, connection: Session | None) -> streaming.TokenStream:
        """A streamed infer's token buffer, known to cancel by its request_id."""
        if connection is None or connection.protocol < 2:
            raise RequestError(p.BAD_REQUEST, "stream: true needs protocol 2 (send hello first)")
        if not request.has_request_id:
            raise RequestError(p.BAD_REQUEST, "stream: true needs a request_id (every chunk carries it)")
        tokens = streaming.TokenStream(asyncio.get_running_loop())
        connection.streams[request.request_id] = tokens
        return tokens

    @staticmethod
    async def _streamed(tokens: streaming.TokenStream, request: p.Request, connection: Session, waiting):
        """Await the job while its tokens go out as chunk frames; the last chunk
        is written before the final answer. A request that ends otherwise
        (cancelled, the client gone, an error) stops the generation at once."""
        async def send_chunk(text: str) -> None:
            await connection.send({"status": "ok", "request_id": request.request_id,
                                   "stream": True, "done": False, "chunk": text})

        def writer_ended(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                tokens.stop("the connection failed while tokens were being sent")
        writer = asyncio.ensure_future(tokens.forward(send_chunk))
        writer.add_done_callback(writer_ended)
        try:
            result = await waiting
        except BaseException:
            tokens.stop("the request ended before its generation")
            writer.cancel()
            raise
        tokens.finish()
        with contextlib.suppress(OSError):   # the connection is closing: its final answer fails too
            await writer
        return result


    def _prepare(self, request: p.Request, blocks: references.Blocks | None, lately_only: bool = False):
        """actions.prepare, after v2 tensor references in input_data are resolved
        (worker thread, or the event loop for a small request: ``lately_only``).
        The references are bounded in number and bytes before anything is mapped.
        The frame's descriptors are closed here: mappings stay valid for as long
        as the arrays on them live."""
        done = True
        try:
            if blocks is not None and request.action == "infer" and \
                    references.has_references(request.body.get("input_data")):
                resolved = references.resolve(request.body["input_data"], blocks,
                                             self.config.max_tensor_elements, "input_data",
                                             max_count=references.MAX_REFERENCES,
                                             max_bytes=references.MAX_REFERENCED_BYTES)
                request = replace(request, body={**request.body, "input_data": resolved})
            return actions.prepare(request, self.config, lately_only)
        except NotResolvedLately:
            done = False   # prepared again in a worker, from the same blocks
            raise
        finally:
            if blocks is not None and done:
                blocks.close()

    def _job_fields(self, request: p.Request, prepared, connection: Session | None) -> dict:
        priority = prepared.priority or (connection.default_priority if connection else None) \
            or jobs.DEFAULT_PRIORITY
        return {
            "priority": jobs.PRIORITIES.index(priority),
            "client": connection.client_key if connection else "daemon",
            "owner": connection.id if connection else None,
            "request_id": request.request_id if request.has_request_id else None,
            "deadline": prepared.deadline,
            "model_key": prepared.spec.key if prepared.spec else None,
        }

    async def _await_job(self, job):
        """The job's result; past its deadline, a job that has not started is
        answered ``timeout`` and never runs (one that has started finishes)."""
        waiting = job.outcome(self._handoff())
        try:
            if job.deadline is None:
                return await waiting
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), max(0.0, job.deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self.device.queue.remove(job, RequestError(p.TIMEOUT, "Timed out before the device could start it"))
                return await waiting
        except asyncio.CancelledError:
            job.future.cancel()   # the request is gone: a job that has not started never runs
            # A running job still settles it later (behind the shield, above):
            # an outcome nobody reads would be logged as never retrieved.
            waiting.cancel()
            raise

    def _handoff(self) -> LoopHandoff:
        """How finished jobs reach this event loop (made on it, at first use)."""
        if self._loop_handoff is None:
            self._loop_handoff = LoopHandoff(asyncio.get_running_loop())
        return self._loop_handoff

    def _hello(self, request: p.Request, connection: Session | None) -> dict:
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
            "priorities": list(jobs.PRIORITIES),
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

    async def _buffer_request(self, request: p.Request, connection: Session | None,
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
        refusal = self.admission.registered_bytes.take_now(uid, size)
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
            self.admission.registered_bytes.charge(uid, answer["size"])
            connection.shm_charged += answer["size"]
        return answer

    def _uncharge_registered(self, connection: Session, size: int) -> None:
        self.admission.registered_bytes.give(connection.peer.uid, size)
        connection.shm_charged -= size

    def _buffer_action(self, request: p.Request, connection: Session | None,
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

    def _cancel(self, request: p.Request, connection: Session | None) -> dict:
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
        tokens = connection.streams.get(target) if known else None
        if known and job is None:
            connection.cancel_requested.add(target)  # still being validated: it will not be queued
            state = "cancelled"
        elif job is not None and self.device.queue.remove(job, scheduler.cancelled_error()):
            state = "cancelled"
        elif tokens is not None:
            tokens.stop("cancelled by the client")   # its final answer follows: done_reason cancelled
            state = "stopping"
        elif job is not None:
            state = "running" if job.started_at else "finishing"
        else:
            state = "unknown"
        return {"action": "cancel", "target": target, "cancelled": state in ("cancelled", "stopping"),
                "state": state}

    @staticmethod
    def _log_fields(request: p.Request, connection: Session | None) -> dict:
        fields = _peer(connection).log_fields()
        if request.has_request_id:
            fields["REQUEST_ID"] = request.request_id
        if connection is not None and connection.client_label:
            fields["CLIENT"] = connection.client_label
        return fields

    def _infer_payload(self, outcome, connection: Session | None = None, result_size: int | None = None):
        """An infer's answer payload; an awaitable of it when a worker encodes
        the result (a large one), so a small one makes no coroutine.
        ``result_size``: the result's bytes as the device thread sized them."""
        result, run_ms, load_ms = outcome
        payload = {"inference_time_ms": round(run_ms, 3)}
        if load_ms:
            payload["load_time_ms"] = round(load_ms, 3)   # this request loaded the model first
        if connection is not None and connection.binary_results:
            # ndarrays stay: Session.send writes them as attachments or memfds.
            return {"result": result, **payload}
        if result_size is not None and result_size <= SMALL_RESULT_BYTES:
            # base64 of a few KiB: cheaper than a hand-over
            return {"result": encode_results(result), **payload}
        return self._encoded_by_worker(result, payload, connection)

    async def _encoded_by_worker(self, result, payload: dict, connection: Session | None) -> dict:
        encoded = await self.worker_pool.run(_work_key(connection), encode_results, result)
        return {"result": encoded, **payload}


def _memfd_size(blocks: references.Blocks | None) -> int:
    """The size of the one descriptor a register_buffer frame carries (0 when
    it carries none or several: the worker then refuses it)."""
    if blocks is None or len(blocks.fds) != 1:
        return 0
    try:
        return os.fstat(blocks.fds[0]).st_size
    except OSError:
        return 0


def _peer(connection: Session | None) -> Peer:
    return connection.peer if connection is not None else Peer(None, None, None)


# A result of at most this many bytes (in a shallow structure: jobs.RESULT_NODES)
# is encoded on the event loop: base64 of a few KiB is cheaper than a hand-over.
SMALL_RESULT_BYTES = 64 * 1024


def _work_key(connection: Session | None):
    """Whose turn a job waits for in the worker pool: the client's uid."""
    return connection.client_key if connection is not None else "daemon"
