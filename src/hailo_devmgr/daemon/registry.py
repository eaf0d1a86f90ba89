"""Loaded models: cache, load on demand, LRU eviction, pins, keep-alive.

Runs on the device thread only (it creates and releases HailoRT objects).
The event loop reads ``snapshot`` and the counters. The set of loaded
models is replaced whole when it changes (atomic reference assignment),
never mutated; each model's figures (uses, last use) are read as they are
when status is asked, so an inference publishes nothing.

A model's name is ``model_type:model_path`` with the path as the client
gave it (v1 services see their own path in ``status``); the file opened is
the resolved one (see model_files.py). Its cache key (``ModelSpec.identity``)
adds the ``model_params`` it was loaded with, so requests whose parameters
differ never share a loaded model: one uid cannot make another's requests
run on files it chose. Pins, ``unload_model`` and the scheduler's affinity
go by name. Every model file (the HEF and those in
``model_params``) is opened here, on the device thread, checked once more
as an open descriptor, and handed to HailoRT as ``/proc/self/fd/N``; a
``LoadedModel`` owns those descriptors and closes them when it is released.

Keep-alive (as Ollama's): every load_model or infer sets how long the model
may stay idle afterwards, from the request's ``keep_alive`` or else the
configured one for its type; the device thread's chore ``unload_idle``
unloads models past it. Only the uid that loaded a model, or an admin, may
make it expire earlier than it would (see ``_keep``): others may only
extend it. Pinned models are never unloaded, and after a
VDevice rebuild ``restore_next_pin`` loads them again.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from . import hailort_status as hs
from .handlers import Handler
from .model_files import UNREADABLE_HINT, ModelFiles
from .settings import Settings, pin_keys
from ..wire.protocol import BAD_REQUEST, DEVICE_UNAVAILABLE, FORBIDDEN, INFERENCE_FAILED, LOAD_FAILED, RESOURCE_EXHAUSTED, RequestError

log = logging.getLogger(__name__)

RETRY_AFTER_FAULT_MS = 1000
FOREVER = -1.0
FRAME_MS_WEIGHT = 0.2   # of the newest call in the moving average (LoadedModel.frame_ms)


@dataclass(frozen=True)
class ModelSpec:
    """A model as a request names it, already validated and resolved."""

    model_type: str
    model_path: str          # as the client wrote it (the name uses this)
    real_path: str           # what is opened (a model_files.AllowedPath from the request's check)
    params: dict             # model_params as check_params returns them: paths resolved (AllowedPaths)
    handler_cls: type[Handler]
    # Derived once, in __post_init__ (a cached_property takes a lock on its
    # first read in Python 3.11: three per request here).
    # key: the model's name, as pins, unload_model, status and the scheduler know it.
    key: str = field(init=False, repr=False, compare=False)
    # params_json: the parameters the loaded model depends on, as canonical
    # JSON ('' for none). check_params keeps only the keys the handler uses;
    # an empty value means what an absent one does (ocr's recognition_hefs: {}).
    params_json: str = field(init=False, repr=False, compare=False)
    # identity: the cache key, the name and the parameters (two loads share a
    # model only if both match).
    identity: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        key = f"{self.model_type}:{self.model_path}"
        used = {name: value for name, value in self.params.items() if value not in (None, "", {})}
        params_json = json.dumps(used, sort_keys=True, separators=(",", ":")) if used else ""
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "params_json", params_json)
        object.__setattr__(self, "identity", f"{key} {params_json}" if params_json else key)

    @classmethod
    def of(cls, model_type: str, model_path: str, real_path: str, params: dict,
           handler_cls: type[Handler]) -> "ModelSpec":
        """The spec a request names. One named without parameters is made once
        and shared while its path resolves to the same checked object
        (model_files keeps that for a second, then checks the file again):
        one frozen object less per small request. Any thread may call it."""
        if params:
            return cls(model_type, model_path, real_path, params, handler_cls)
        name = (model_type, model_path)
        known = _PLAIN_SPECS.get(name)
        if known is not None and known.real_path is real_path and known.handler_cls is handler_cls:
            return known
        if len(_PLAIN_SPECS) >= _PLAIN_SPECS_MAX:
            _PLAIN_SPECS.clear()
        spec = _PLAIN_SPECS[name] = cls(model_type, model_path, real_path, params, handler_cls)
        return spec


_PLAIN_SPECS: dict = {}   # (model_type, model_path) -> ModelSpec without parameters
_PLAIN_SPECS_MAX = 1024


@dataclass
class LoadedModel:
    spec: ModelSpec
    handler: Handler
    loaded_at: float          # Unix time
    last_used: float          # Unix time
    last_used_mono: float     # for ordering; immune to clock changes
    load_ms: float
    uses: int = 0
    pinned: bool = False
    keep_alive_s: float | None = None   # idle seconds allowed; None = forever
    idle_since: float = 0.0             # Unix time of the last request that touched it
    idle_since_mono: float = 0.0
    files: ModelFiles = field(default_factory=ModelFiles)  # open until the model is released
    loaded_by_uid: int | None = None    # who loaded it (only that uid or an admin may unload it
                                        # or shorten its keep-alive); None: the daemon (a pin)
    loaded_by_admin: bool = False
    frame_ms: float | None = None       # device time per request, moving average (batch sizes)
    keep_alive_fields: dict = field(default_factory=dict)  # log fields of the request that set it

    def expires_mono(self) -> float | None:
        """When keep-alive unloads it (monotonic), or None for never."""
        if self.pinned or self.keep_alive_s is None:
            return None
        return self.idle_since_mono + self.keep_alive_s

    def info(self) -> dict:
        forever = self.pinned or self.keep_alive_s is None
        return {
            "model_type": self.spec.model_type,
            "model_path": self.spec.model_path,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
            "uses": self.uses,
            "load_time_ms": round(self.load_ms, 1),
            "pinned": self.pinned,
            "keep_alive_s": None if forever else self.keep_alive_s,
            "expires_at": None if forever else round(self.idle_since + self.keep_alive_s, 3),
            "model_params": json.loads(self.spec.params_json or "{}"),
        }


def eviction_order(models: list[LoadedModel]) -> list[LoadedModel]:
    """Unpinned models, least recently used first; ties broken by cache key."""
    candidates = [model for model in models if not model.pinned]
    return sorted(candidates, key=lambda model: (model.last_used_mono, model.spec.identity))


def _uid(log_fields: dict | None) -> int | None:
    """The requester's uid; None for the daemon's own requests (pins)."""
    return (log_fields or {}).get("CLIENT_UID")


def _may_manage(model: LoadedModel, uid: int | None, admin: bool) -> bool:
    """Whether a requester may unload ``model`` or shorten its keep-alive."""
    return admin or model.loaded_by_uid is None or model.loaded_by_uid == uid


def _trusted(model: LoadedModel, uid: int | None) -> bool:
    """Whether a request without model_params may use ``model``, loaded with some:
    its own uid, an admin or the daemon (a pin) chose them."""
    return model.loaded_by_admin or model.loaded_by_uid is None or model.loaded_by_uid == uid


def _shortens(model: LoadedModel, keep_s: float | None) -> bool:
    """Whether a keep-alive of ``keep_s`` (None = forever), starting now, would
    unload ``model`` earlier than its current one will."""
    if model.pinned or keep_s is None:
        return False  # a pinned model never expires, whatever its keep-alive
    expires = model.expires_mono()
    return expires is None or time.monotonic() + keep_s < expires


def _shorten_refused(model: LoadedModel, keep_s: float) -> RequestError:
    expires = model.expires_mono()
    now = "never" if expires is None else f"in {max(0.0, expires - time.monotonic()):.0f} s"
    return RequestError(FORBIDDEN, f"Model {model.spec.model_path} was loaded by another user (uid "
                                   f"{model.loaded_by_uid}); only that user or an admin may shorten its "
                                   f"keep_alive (it expires {now}; keep_alive {keep_s:g} s would end it "
                                   "sooner): send a longer keep_alive, or none")


def _failure(prefix: str, exc: Exception, default_code: str, files: ModelFiles) -> RequestError:
    """Translate a HailoRT failure into the error a client reads."""
    status = hs.status_of(exc)
    reason = files.shown(hs.describe(exc))
    if status == hs.OPEN_FILE_FAILURE:
        reason += f"; {UNREADABLE_HINT}"
    code = {hs.RESOURCE_EXHAUSTED: RESOURCE_EXHAUSTED}.get(status, default_code)
    retry_after_ms = None
    if status in hs.RUNTIME_BROKEN:
        code = DEVICE_UNAVAILABLE
        retry_after_ms = RETRY_AFTER_FAULT_MS  # the device thread rebuilds the device first
    return RequestError(code, f"{prefix}{reason}", retry_after_ms=retry_after_ms)


def _average_frame_ms(model: LoadedModel, frame_ms: float) -> None:
    previous = model.frame_ms
    model.frame_ms = frame_ms if previous is None else previous + FRAME_MS_WEIGHT * (frame_ms - previous)


def _shown(error: RequestError, files: ModelFiles) -> RequestError:
    """A handler's own error, naming model files by their real paths, not /proc/self/fd/N."""
    message = files.shown(error.message)
    if message == error.message:
        return error
    return _each(error, message)


def _each(error: RequestError, message: str | None = None) -> RequestError:
    """A copy of ``error`` (with another message): each request of a batch
    raises its own, so no traceback grows from being raised twice."""
    copy = RequestError(error.code, error.message if message is None else message,
                        retry_after_ms=error.retry_after_ms, fatal=error.fatal, field=error.field)
    copy.__cause__ = error.__cause__
    return copy


class ModelRegistry:
    def __init__(self, runtime, settings: Settings):
        self.runtime = runtime
        self.settings = settings   # max_loaded_models, pin, keep_alive: read at each use
        self._models: dict[str, LoadedModel] = {}  # by ModelSpec.identity
        # Pinned models as the daemon's own load_model named them (name → spec:
        # only the pin's own model_params are pinned; to reload them after a
        # rebuild), and the names still to reload.
        self._pin_specs: dict[str, ModelSpec] = {}
        self._restore: list[str] = []
        # Read by the event loop; replaced whole, never mutated.
        self._published: tuple[LoadedModel, ...] = ()
        self.loaded_keys: frozenset[str] = frozenset()   # "type:path" of each, for the scheduler's affinity
        self.total_evictions = 0
        self.last_capacity_event: tuple[str | None, str | None, float | None] = (None, None, None)
        runtime.on_close.append(self.release_all)
        runtime.on_open.append(self._schedule_restore)

    # -- requests -------------------------------------------------------------

    def load(self, spec: ModelSpec, log_fields: dict | None = None,
             keep_alive: float | None = None, admin: bool = True) -> tuple[LoadedModel, bool]:
        """The loaded model for ``spec``; True if it was loaded already.

        ``log_fields`` (client pid/uid, request id) go into the log line;
        ``keep_alive`` is the request's (seconds, negative = forever; None =
        the configured one); ``admin``: the requester may shorten any model's
        keep-alive."""
        if spec.key in self.pins and _uid(log_fields) is None:
            self._pin_specs[spec.key] = spec
            self._refresh_pins()
        model = self._find(spec, _uid(log_fields))
        if model is not None:
            self._keep(model, keep_alive, log_fields, admin)   # status reads its fields live
            return model, True
        vdevice = self.runtime.require()
        # Before any eviction: a file that may not be opened costs no other model its place.
        files, path, params = self._open_files(spec)
        try:
            while len(self._models) >= self.max_loaded_models:
                if not self._evict_one(f"max_loaded_models ({self.max_loaded_models}) reached", spec.key,
                                       log_fields):
                    raise RequestError(RESOURCE_EXHAUSTED, f"Failed to load model: max_loaded_models "
                                       f"({self.max_loaded_models}) reached and every loaded model is pinned")
            model = self._load_evicting(spec, vdevice, files, path, params, log_fields, admin)
        except BaseException:
            files.close()
            raise
        self._keep(model, keep_alive, log_fields, admin)
        self._models[spec.identity] = model
        self._publish()
        log.info("loaded %s in %.0f ms", spec.key, model.load_ms,
                 extra={**(log_fields or {}), "MODEL": spec.model_path, "MODEL_TYPE": spec.model_type,
                        "DURATION_MS": round(model.load_ms)})
        return model, False

    def infer(self, spec: ModelSpec, inputs: Any, timeout_ms: int, backend_options: Any,
              log_fields: dict | None = None, keep_alive: float | None = None,
              admin: bool = True, model: LoadedModel | None = None) -> tuple[Any, float]:
        """Run one inference (loading first if needed: ``model`` is the one the
        caller loaded just before, if any); returns (result, run ms)."""
        return self._run(spec, lambda handler: handler.run(inputs, timeout_ms), backend_options,
                         log_fields, keep_alive, admin, model)

    def generate(self, spec: ModelSpec, inputs: Any, timeout_ms: int, on_token, backend_options: Any,
                 log_fields: dict | None = None, keep_alive: float | None = None,
                 admin: bool = True, model: LoadedModel | None = None) -> tuple[Any, float]:
        """``infer`` token by token, for model types whose handler has ``generate`` (llm,
        vlm, vlm_chat): calls ``on_token(text) -> bool`` on this (the device) thread
        for each piece of text (False aborts the generation on the device:
        done_reason "cancelled"); returns (result with its statistics, run ms)."""
        if not callable(getattr(spec.handler_cls, "generate", None)):
            raise RequestError(BAD_REQUEST, f"model type {spec.model_type} does not generate tokens; "
                                            "streaming is for llm, vlm and vlm_chat")
        return self._run(spec, lambda handler: handler.generate(inputs, timeout_ms, on_token), backend_options,
                         log_fields, keep_alive, admin, model)

    def infer_batch(self, model: LoadedModel, inputs: list, timeout_ms: int,
                    log_fields: dict | None = None) -> list[tuple[Any, BaseException | None]]:
        """Several requests' inferences on ``model`` (``load`` just returned it
        for each) in one device call; for each request ``((result, run ms),
        None)`` or ``(None, its error)``. An input the model cannot take fails
        its own request only; a failed run fails every request in it.
        ``log_fields``: the first request's, for what is logged of the model."""
        outcomes: list = [None] * len(inputs)
        frames, members = [], []
        binding = time.perf_counter()   # the device thread's time for the batch: binds (copies) too
        for index, one in enumerate(inputs):
            try:
                frames.append(model.handler.bind(one))
                members.append(index)
            except RequestError as error:
                outcomes[index] = (None, _shown(error, model.files))
            except Exception as error:   # answered as any handler's fault is
                outcomes[index] = (None, error)
        if not frames:
            return outcomes
        bind_ms = (time.perf_counter() - binding) * 1000
        try:
            results, run_ms = self._call(model, lambda handler: handler.run_frames(frames, timeout_ms), None,
                                         log_fields, len(frames))
        except RequestError as error:
            for index in members:
                outcomes[index] = (None, _each(error))
        else:
            _average_frame_ms(model, (bind_ms + run_ms) / len(frames))
            for index, result in zip(members, results):
                outcomes[index] = ((result, run_ms), None)
        return outcomes

    def is_loaded(self, model: LoadedModel) -> bool:
        """Whether ``model`` is still the one loaded under its identity."""
        return self._models.get(model.spec.identity) is model

    def batch_limit(self, spec: ModelSpec, log_fields: dict | None) -> int:
        """How many requests for ``spec`` may share one device call now: as
        many as its handler allows, within ``scheduling.max_batch_ms`` of
        device time. The device is not pre-empted, so whoever waits behind a
        batch (an interactive request) waits that much more at worst. 1 until
        its model has run once (the first request loads it, alone)."""
        model = self._find(spec, _uid(log_fields))
        if model is None or model.frame_ms is None:
            return 1
        by_time = int(self.settings.config.scheduling.max_batch_ms / max(model.frame_ms, 0.001))
        return max(1, min(model.handler.batch_limit(), by_time))

    def _run(self, spec: ModelSpec, call, backend_options: Any, log_fields: dict | None,
             keep_alive: float | None, admin: bool, model: LoadedModel | None) -> tuple[Any, float]:
        """``call(handler)`` on the model (loaded first if needed)."""
        if model is None or not self.is_loaded(model):
            model, _ = self.load(spec, log_fields, keep_alive, admin)
        result, run_ms = self._call(model, call, backend_options, log_fields)
        _average_frame_ms(model, run_ms)   # (binding included: run binds its inputs)
        return result, run_ms

    def _call(self, model: LoadedModel, call, backend_options: Any, log_fields: dict | None,
              uses: int = 1) -> tuple[Any, float]:
        """``call(model.handler)`` for ``uses`` requests: HailoRT's failures
        become answers, and those that break the model or the device are
        dealt with here."""
        started = time.perf_counter()
        try:
            with self.runtime.backend.request_scope(backend_options):
                result = call(model.handler)
        except RequestError as error:
            raise _shown(error, model.files) from None
        except Exception as exc:
            error = _failure("Inference failed: ", exc, INFERENCE_FAILED, model.files)
            status = hs.status_of(exc)
            if status in hs.RUNTIME_BROKEN:
                self.runtime.mark_broken(hs.describe(exc))
            elif status in hs.SHUTS_MODEL_DOWN and model.handler.failed_run_breaks_model:
                error = self._discard_broken(model, error, log_fields)
            raise error from exc
        finally:
            model.uses += uses
            model.last_used = model.idle_since = time.time()
            model.last_used_mono = model.idle_since_mono = time.monotonic()
        return result, (time.perf_counter() - started) * 1000

    def unload(self, model_type: str, model_path: str, log_fields: dict | None = None,
               admin: bool = True) -> bool:
        """Unload every unpinned model of this name (whatever its model_params) the
        requester may unload: a non-admin only those its own uid loaded."""
        key = f"{model_type}:{model_path}"
        named = [model for model in self._models.values() if model.spec.key == key]
        mine = [model for model in named if not model.pinned and _may_manage(model, _uid(log_fields), admin)]
        for model in mine:
            self._drop(model)
            log.info("unloaded %s", model.spec.identity,
                     extra={**(log_fields or {}), "MODEL": model_path, "MODEL_TYPE": model_type})
        self._publish()
        if mine:
            return True
        if key in self.pins:
            raise RequestError(FORBIDDEN, f"Model {model_path} is pinned by the configuration (pin:) "
                                          "and cannot be unloaded")
        if named:
            raise RequestError(FORBIDDEN, f"Model {model_path} was loaded by another user (uid "
                                          f"{named[0].loaded_by_uid}); only that user or an admin may unload it")
        return False

    def release_all(self) -> None:
        for key in list(self._models):
            self._drop(self._models[key])
        self._publish()

    @property
    def max_loaded_models(self) -> int:
        return self.settings.config.max_loaded_models

    @property
    def pins(self) -> frozenset[str]:
        return self.settings.derived(pin_keys)

    def settings_changed(self) -> None:
        """After a reload (device thread): models pinned or unpinned by it say
        so at once; max_loaded_models applies at the next load, keep_alive at
        each model's next use."""
        self._refresh_pins()
        self._publish()

    # -- chores (the device thread runs them between jobs) ---------------------

    def idle_due(self) -> float | None:
        """When the next model's keep-alive runs out (monotonic), or None."""
        times = [t for t in (model.expires_mono() for model in self._models.values()) if t is not None]
        return min(times) if times else None

    def unload_idle(self) -> None:
        """Unload every unpinned model idle past its keep-alive; one log line each."""
        now = time.monotonic()
        for model in list(self._models.values()):
            expires = model.expires_mono()
            if expires is None or expires > now:
                continue
            self._drop(model)
            # With the fields of the request that set the keep-alive (and so chose this unload).
            log.info("unloaded %s: idle for %.1f s (keep_alive %g s)", model.spec.identity,
                     now - model.idle_since_mono, model.keep_alive_s,
                     extra={**model.keep_alive_fields, "MODEL": model.spec.model_path,
                            "MODEL_TYPE": model.spec.model_type})
        self._publish()

    def restore_due(self) -> float | None:
        """Now, while pinned models wait to be reloaded on an open device."""
        if self._restore and self.runtime.vdevice is not None and not self.runtime.throttled:
            return 0.0
        return None

    def restore_next_pin(self) -> None:
        """Reload one pinned model dropped by a device rebuild."""
        key = self._restore.pop(0)
        spec = self._pin_specs.get(key)
        if spec is None or key not in self.pins or spec.identity in self._models:
            return
        try:
            self.load(spec)
        except RequestError as error:
            log.error("pinned model %s could not be reloaded: %s", key, error.message,
                      extra={"MODEL": spec.model_path, "MODEL_TYPE": spec.model_type, "CODE": error.code})
        else:
            log.info("reloaded pinned model %s", key,
                     extra={"MODEL": spec.model_path, "MODEL_TYPE": spec.model_type})

    def _schedule_restore(self) -> None:
        """After the device (re)opened: every pinned model we know of that is not loaded."""
        self._restore = [key for key, spec in self._pin_specs.items()
                         if key in self.pins and spec.identity not in self._models]

    def _is_pinned(self, spec: ModelSpec) -> bool:
        """Pinned: the name is in config ``pin:`` and the parameters are the pin's own
        (a client's other model_params for that name get a model of their own, unpinned)."""
        pin = self._pin_specs.get(spec.key)
        return spec.key in self.pins and pin is not None and pin.identity == spec.identity

    def _refresh_pins(self) -> None:
        for model in self._models.values():
            model.pinned = self._is_pinned(model.spec)

    def _find(self, spec: ModelSpec, uid: int | None) -> LoadedModel | None:
        """The loaded model a request for ``spec`` gets: the one loaded with exactly its
        model_params. A client's request without any also gets one loaded with some
        by its own uid, an admin or the daemon (the most recently used): v1 services
        load with model_params and infer without them, and pins carry them. Never
        another uid's: it would run the request on files that uid chose."""
        exact = self._models.get(spec.identity)
        if spec.params_json or uid is None:
            return exact
        tuned = [model for model in self._models.values()
                 if model.spec.key == spec.key and model.spec.params_json and _trusted(model, uid)]
        return max(tuned, key=lambda model: model.idle_since_mono) if tuned else exact

    # -- internals ------------------------------------------------------------

    @staticmethod
    def _open_files(spec: ModelSpec) -> tuple[ModelFiles, str, dict]:
        """Open every file of ``spec`` (see model_files.open_model).

        Returns the open files, the path HailoRT reads the model from and
        the params with theirs (``/proc/self/fd/N`` each). The handler's own
        ``check_params`` runs again, with an opener instead of a resolver,
        so it alone says which params name files."""
        files = ModelFiles()
        try:
            path = files.open(spec.real_path, shown=spec.model_path)
            if spec.handler_cls.sends_path_to_device:
                path = files.host_link(path)
            params = spec.handler_cls.check_params(spec.params, files.open)
        except BaseException:
            files.close()
            raise
        return files, path, params

    def _load_evicting(self, spec: ModelSpec, vdevice: Any, files: ModelFiles, path: str, params: dict,
                       log_fields: dict | None, admin: bool) -> LoadedModel:
        """Load; on RESOURCE_EXHAUSTED evict the LRU model and retry, while any is left."""
        while True:
            handler = spec.handler_cls(self.runtime.platform, vdevice, path, params,
                                       activate_to_run=self.runtime.device_config.scheduling_algorithm == "none")
            started = time.perf_counter()
            try:
                with self.runtime.placement.widened():   # HailoRT's threads for it: any CPU
                    handler.load()
            except RequestError as error:
                raise _shown(error, files) from None
            except Exception as exc:
                status = hs.status_of(exc)
                if status == hs.RESOURCE_EXHAUSTED:
                    self._capacity_event("device memory exhausted (HAILO_RESOURCE_EXHAUSTED)", spec.key,
                                         spec.model_path)
                    if self._evict_one("device memory exhausted (HAILO_RESOURCE_EXHAUSTED)", spec.key,
                                       log_fields):
                        continue
                if status in hs.RUNTIME_BROKEN:
                    self.runtime.mark_broken(hs.describe(exc))
                raise _failure("Failed to load model: ", exc, LOAD_FAILED, files) from exc
            now = time.time()
            return LoadedModel(spec, handler, loaded_at=now, last_used=now,
                               last_used_mono=time.monotonic(),
                               load_ms=(time.perf_counter() - started) * 1000,
                               pinned=self._is_pinned(spec), files=files,
                               loaded_by_uid=_uid(log_fields), loaded_by_admin=admin)

    def _keep(self, model: LoadedModel, requested: float | None, log_fields: dict | None,
              admin: bool) -> None:
        """Start the model's idle time now, with the request's keep-alive or the configured one.

        A requester that may not unload the model may not bring its end
        closer either (keep_alive 0 would be an unload): an explicit
        ``keep_alive`` that would is ``forbidden``; the configured one is
        then not applied (the current one restarts)."""
        seconds = requested
        if seconds is None:
            configured = self.settings.config.keep_alive   # model type → seconds
            seconds = configured.get(model.spec.model_type, configured.get("default", FOREVER))
        # Negative is forever; so is a non-finite one (JSON lets NaN and 1e999 through),
        # which status could not even encode.
        keep_s = None if seconds < 0 or not math.isfinite(seconds) else float(seconds)
        if _shortens(model, keep_s) and not _may_manage(model, _uid(log_fields), admin):
            if requested is not None:
                raise _shorten_refused(model, keep_s)
            keep_s = model.keep_alive_s
        model.keep_alive_s = keep_s
        model.keep_alive_fields = dict(log_fields or {})
        model.idle_since = time.time()
        model.idle_since_mono = time.monotonic()

    def _evict_one(self, reason: str, wanted: str, log_fields: dict | None = None) -> bool:
        order = eviction_order(list(self._models.values()))
        if not order:
            return False
        victim = order[0]
        self._drop(victim)
        self.total_evictions += 1
        self._capacity_event(reason, wanted, victim.spec.model_path)
        self._publish()
        log.info("evicted %s (least recently used) to load %s: %s", victim.spec.key, wanted, reason,
                 extra={**(log_fields or {}), "MODEL": victim.spec.model_path,
                        "MODEL_TYPE": victim.spec.model_type})
        return True

    def _discard_broken(self, model: LoadedModel, error: RequestError,
                        log_fields: dict | None = None) -> RequestError:
        """Unload a model HailoRT shut down (a failed submit: SHUTS_MODEL_DOWN).

        Every later run on it would fail: the next request loads it afresh
        (a pinned model is reloaded by the restore chore). Only these
        statuses, only for InferModel handlers: a client cannot make the
        daemon unload models with requests that merely fail."""
        key = model.spec.identity
        if self._models.get(key) is model:
            self._drop(model)
            if model.pinned:
                self._schedule_restore()
            self._publish()
        log.warning("unloaded %s after a failed run; it loads again on the next request: %s", key,
                    error.message, extra={**(log_fields or {}), "MODEL": model.spec.model_path,
                                          "MODEL_TYPE": model.spec.model_type})
        return RequestError(error.code, f"{error.message} (the model was unloaded and loads again on the "
                                        "next request)", retry_after_ms=error.retry_after_ms)

    def _capacity_event(self, reason: str, wanted: str, model_path: str) -> None:
        """Room ran out loading ``wanted`` (a cache key); ``model_path`` is the model
        evicted for it, or ``wanted``'s own path when none could be (as the
        earlier daemon reported it: its web portal shows these fields)."""
        model_type, _, path = wanted.partition(":")
        self.last_capacity_event = (f"{reason} while loading {os.path.basename(path)} ({model_type})",
                                    model_path, time.time())

    def _drop(self, model: LoadedModel) -> None:
        """Take a model out of the cache and release its HailoRT objects, then its files."""
        del self._models[model.spec.identity]
        try:
            model.handler.release()
        except Exception:
            log.exception("releasing %s failed", model.spec.identity)
        finally:
            model.files.close()  # after HailoRT let go of the model

    def _publish(self) -> None:
        self._published = published = tuple(self._models.values())
        self.loaded_keys = frozenset(model.spec.key for model in published)

    @property
    def snapshot(self) -> tuple[dict, ...]:
        """The loaded models as status shows them (any thread)."""
        return tuple(model.info() for model in self._published)
