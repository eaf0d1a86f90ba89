"""Device actions (load_model, infer, unload_model): from a request to a device job.

``prepare`` validates every field, applies the model-file rules and
decodes tensors; it runs in a worker thread, before the device sees
anything. ``device_job`` turns the result into the callable the device
thread runs, with its label and time budget (for the watchdog).
"""
from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..wire import protocol as p
from .device import begin_phase
from .handlers import HANDLERS, InputLimits
from .model_files import resolve_model_path
from ..wire.protocol import RequestError
from .registry import ModelSpec
from .jobs import PRIORITIES

MAX_TIMEOUT_MS = 3_600_000
MAX_KEEP_ALIVE_S = 10 * 365 * 86400.0   # a decade: beyond that, say -1 (forever)
# keep_alive as Ollama takes it: seconds, or a duration such as "10m", "1h", "-1".
_DURATION = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass
class DeviceRequest:
    action: str
    model_type: str
    model_path: str
    spec: ModelSpec | None = None       # None for unload_model (no file is opened)
    inputs: Any = None                  # decoded input_data, for infer
    backend_options: Any = None         # the backend's own knobs in model_params (Backend.request_options)
    log_fields: dict = field(default_factory=dict)
    keep_alive: float | None = None     # seconds (negative = forever); None = configured
    priority: str | None = None         # scheduling class; None = the client's default
    deadline: float | None = None       # monotonic; not started by then -> timeout
    admin: bool = True                  # the client may unload, or shorten the keep-alive of,
                                        # models other uids loaded
    stream: bool = False                # infer token by token (generative model types, protocol v2)


def _model_type(body: dict) -> str:
    model_type = body.get("model_type", p.DEFAULT_MODEL_TYPE)
    if not isinstance(model_type, str) or model_type not in HANDLERS:
        shown = model_type if isinstance(model_type, str) else json.dumps(model_type)
        raise RequestError(p.UNSUPPORTED_MODEL_TYPE, f"Unsupported model_type: {shown}")
    return model_type


def _model_path(body: dict, action: str) -> str:
    if action == "infer" and (not body.get("model_path") or "input_data" not in body):
        raise RequestError(p.BAD_REQUEST, "model_path and input_data required")  # v1 text
    if not body.get("model_path"):
        raise RequestError(p.BAD_REQUEST, "model_path required")  # v1 text
    model_path = body["model_path"]
    if not isinstance(model_path, str):
        raise RequestError(p.BAD_REQUEST, f"model_path must be a string, got {p.json_type(model_path)}")
    return model_path


def keep_alive_seconds(body: dict) -> float | None:
    """The request's ``keep_alive``: None when absent, else seconds (negative = forever)."""
    value = body.get("keep_alive")
    if value is None:
        return None
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match:
            seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds is not None and -MAX_KEEP_ALIVE_S <= seconds <= MAX_KEEP_ALIVE_S:  # also refuses NaN
        return float(seconds)
    raise RequestError(p.BAD_REQUEST, f"keep_alive must be a number of seconds (-1 = forever, 0 = unload "
                                      f"after this request) or a duration like \"10m\", got {value!r}")


def scheduling_fields(body: dict) -> tuple[str | None, float | None]:
    """``priority`` (a class name) and ``timeout_ms`` (-> a monotonic deadline)."""
    priority = body.get("priority")
    if priority is not None and priority not in PRIORITIES:
        raise RequestError(p.BAD_REQUEST, f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    timeout_ms = p.optional_number(body, "timeout_ms", None, minimum=1, maximum=MAX_TIMEOUT_MS, integer=True)
    deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms is not None else None
    return priority, deadline


def hailort_timeout_ms(budget_ms: int, deadline: float | None) -> int:
    """The timeout a HailoRT call gets: its budget, capped by what is left of the deadline."""
    if deadline is None:
        return budget_ms
    return max(1, min(budget_ms, int((deadline - time.monotonic()) * 1000)))


def prepare(request: p.Request, config, lately_only: bool = False) -> DeviceRequest:
    """Check every field and decode tensors (worker thread; or the event loop
    with ``lately_only``: model paths not resolved lately raise NotResolvedLately)."""
    body, action = request.body, request.action
    model_path = _model_path(body, action)
    model_type = _model_type(body)
    prepared = DeviceRequest(action, model_type, model_path)
    prepared.priority, prepared.deadline = scheduling_fields(body)
    if action == "unload_model":
        return prepared
    handler_cls = HANDLERS[model_type]
    prepared.keep_alive = keep_alive_seconds(body)
    params = p.optional_object(body, "model_params")
    dirs = config.model_dirs
    real_path = resolve_model_path(model_path, dirs, lately_only=lately_only)
    checked = handler_cls.check_params(
        params, lambda path, name: resolve_model_path(path, dirs, f"model_params.{name}", lately_only))
    prepared.spec = ModelSpec.of(model_type, model_path, real_path, checked, handler_cls)
    if action == "infer":
        prepared.stream = _stream_flag(body, handler_cls, model_type)
        limits = _input_limits(config.max_tensor_elements, config.max_audio_s)
        prepared.inputs = handler_cls.parse_input(body["input_data"], limits)
    return prepared


@functools.lru_cache(maxsize=8)
def _input_limits(max_tensor_elements: int, max_audio_s: float) -> InputLimits:
    return InputLimits(max_tensor_elements=max_tensor_elements, max_audio_s=max_audio_s)


def _stream_flag(body: dict, handler_cls, model_type: str) -> bool:
    value = body.get("stream", False)
    if not isinstance(value, bool):
        raise RequestError(p.BAD_REQUEST, f"stream must be true or false, got {p.json_type(value)}")
    if value and not callable(getattr(handler_cls, "generate", None)):
        raise RequestError(p.BAD_REQUEST, f"model type {model_type} does not stream tokens "
                                          "(stream: true is for generative model types)")
    return value


def device_job(request: DeviceRequest, registry, budgets,
               on_token: Callable[[str], bool] | None = None) -> tuple[Callable[[], Any], str, float]:
    """(callable for the device thread, label, budget in seconds). ``on_token``:
    for a streamed infer, called on the device thread per piece of text."""
    model_type, model_path, spec = request.model_type, request.model_path, request.spec

    if request.action == "unload_model":
        def unload():
            unloaded = registry.unload(model_type, model_path, request.log_fields, request.admin)
            return {"model_path": model_path, "model_type": model_type,
                    "message": "Model unloaded" if unloaded else "Model was not loaded"}
        return unload, f"unload {model_type}:{model_path}", budgets.other_budget_s

    if request.action == "load_model":
        def load():
            _check_thermal(registry)
            model, already = registry.load(spec, request.log_fields, request.keep_alive, request.admin)
            return {"model_path": model_path, "model_type": model_type,
                    "message": "Model already loaded" if already else "Model loaded",
                    **model.handler.load_info()}
        return load, f"load {spec.key}", budgets.load_budget_s

    call = InferCall(request, registry, budgets, on_token)
    return call, f"infer {spec.key}", budgets.load_budget_s


class InferCall:
    """An infer on the device thread: called alone, or, when it has a
    ``batch_key``, with the requests for the same model that would run right
    after it, in one device call (:meth:`run_batch`, device.py)."""

    def __init__(self, request: DeviceRequest, registry, budgets, on_token: Callable[[str], bool] | None):
        self.request = request
        self.registry = registry
        # Some requests are several device calls (whisper: one per 30 s window),
        # each with the whole infer budget.
        self.infer_budget_s = budgets.infer_budget_s * request.spec.handler_cls.device_calls(request.inputs)
        self.load_budget_s = budgets.load_budget_s
        self.on_token = on_token
        self.load_ms = 0.0   # this request's load on demand
        self.batch_key = _batch_key(request)

    def __call__(self) -> tuple[Any, float, float]:
        # Two phases, each budgeted on its own for the watchdog: a load on
        # demand (the job's own budget), then the inference.
        request, spec, registry = self.request, self.request.spec, self.registry
        model = self._load()
        begin_phase(f"infer {spec.key}", self.infer_budget_s)
        # The HailoRT timeout: the infer budget, capped by what the load left of the deadline.
        timeout_ms = hailort_timeout_ms(int(self.infer_budget_s * 1000), request.deadline)
        try:
            if request.stream:
                result, run_ms = registry.generate(spec, request.inputs, timeout_ms, self.on_token,
                                                   request.backend_options, request.log_fields,
                                                   request.keep_alive, request.admin, model)
            else:
                result, run_ms = registry.infer(spec, request.inputs, timeout_ms, request.backend_options,
                                                request.log_fields, request.keep_alive, request.admin, model)
        except RequestError as error:
            raise _as_deadline(error, request.deadline) from None
        return result, run_ms, self.load_ms

    def _load(self):
        """The request's model (loaded on demand), after the thermal check."""
        request = self.request
        begin_phase(f"infer {request.spec.key}", self.load_budget_s)   # also within a batch
        _check_thermal(self.registry)
        model, already = self.registry.load(request.spec, request.log_fields, request.keep_alive, request.admin)
        self.load_ms = 0.0 if already else model.load_ms
        return model

    def batch_limit(self) -> int:
        """How many requests (this one included) may share its device call."""
        return self.registry.batch_limit(self.request.spec, self.request.log_fields)

    @staticmethod
    def run_batch(calls: list["InferCall"]) -> list[tuple[Any, BaseException | None]]:
        """Calls of one ``batch_key``, in their order: each loads (or finds) its
        model as it would alone; those that got the same loaded model run
        together. Per call ``(result, None)`` or ``(None, error)``."""
        outcomes: list = [None] * len(calls)
        groups: dict[int, tuple[Any, list[int]]] = {}   # id(model) -> (model, indices)
        for index, call in enumerate(calls):
            try:
                model = call._load()
            except Exception as error:
                outcomes[index] = (None, error)
                continue
            groups.setdefault(id(model), (model, []))[1].append(index)
        for model, members in groups.values():
            first = calls[members[0]]
            registry = first.registry
            if not registry.is_loaded(model):   # released meanwhile (a run before broke the device)
                for index in members:
                    outcomes[index] = _outcome(calls[index])
                continue
            begin_phase(f"infer {model.spec.key} (a batch of {len(members)})", first.infer_budget_s)
            ran = registry.infer_batch(model, [calls[index].request.inputs for index in members],
                                       int(first.infer_budget_s * 1000), first.request.log_fields)
            for index, (done, error) in zip(members, ran):
                outcomes[index] = (None, error) if error is not None else (
                    (*done, calls[index].load_ms), None)
        return outcomes


def _check_thermal(registry) -> None:
    # Again on the device thread: the chip may have heated while queued.
    refusal = registry.runtime.thermal_refusal()
    if refusal is not None:
        raise refusal


def _outcome(call: InferCall) -> tuple[Any, BaseException | None]:
    try:
        return call(), None
    except Exception as error:
        return None, error


def _batch_key(request: DeviceRequest):
    """Requests with equal keys may share a device call: same model name and
    parameters, a model type that batches, and nothing of their own that
    the call would have to honour (a deadline, backend options, streaming).
    Which loaded model each gets (a uid's own tuned one) is decided per
    request when they run."""
    if request.stream or request.deadline is not None or request.backend_options is not None \
            or not request.spec.handler_cls.runs_in_batches:
        return None
    return request.spec.identity


def _as_deadline(error: RequestError, deadline: float | None) -> RequestError:
    """A HailoRT timeout that came because the request's own ``timeout_ms`` ran
    out is that request's ``timeout``, not an inference failure: one code for
    one cause, whether the deadline passed in the queue or on the device."""
    if deadline is None or error.code != p.INFERENCE_FAILED or "HAILO_TIMEOUT" not in error.message \
            or time.monotonic() < deadline - 0.01:
        return error
    return RequestError(p.TIMEOUT, f"Timed out: the request's timeout_ms ran out during the inference "
                                   f"({error.message})")
