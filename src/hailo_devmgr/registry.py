"""Loaded models: cache, load on demand, LRU eviction, pins.

Runs on the device thread only (it creates and releases HailoRT objects).
The event loop reads ``snapshot`` and the counters, which are replaced
whole after every change (atomic reference assignment), never mutated.

Cache key ``model_type:model_path`` with the path as the client gave it
(v1 services see their own path in ``status``); the file opened is the
resolved one (see model_files.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from . import hailort_status as hs
from .handlers import Handler
from .protocol import (DEVICE_UNAVAILABLE, FORBIDDEN, INFERENCE_FAILED, LOAD_FAILED,
                       RESOURCE_EXHAUSTED, RequestError)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A model as a request names it, already validated and resolved."""

    model_type: str
    model_path: str          # as the client wrote it (the cache key uses this)
    real_path: str           # what is opened
    params: dict             # model_params, paths resolved
    handler_cls: type[Handler]

    @property
    def key(self) -> str:
        return f"{self.model_type}:{self.model_path}"


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

    def info(self) -> dict:
        return {
            "model_type": self.spec.model_type,
            "model_path": self.spec.model_path,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
            "uses": self.uses,
            "load_time_ms": round(self.load_ms, 1),
            "pinned": self.pinned,
        }


def eviction_order(models: list[LoadedModel]) -> list[LoadedModel]:
    """Unpinned models, least recently used first; ties broken by key."""
    candidates = [model for model in models if not model.pinned]
    return sorted(candidates, key=lambda model: (model.last_used_mono, model.spec.key))


def _failure(prefix: str, exc: Exception, default_code: str) -> RequestError:
    """Translate a HailoRT failure into the error a client reads."""
    status = hs.status_of(exc)
    reason = hs.describe(exc)
    if status == hs.OPEN_FILE_FAILURE:
        reason += ("; the daemon's user (hailo-device-mgr) cannot read the file: make it readable "
                   "by group hailo, e.g. put it under /var/lib/hailo/models")
    code = {hs.RESOURCE_EXHAUSTED: RESOURCE_EXHAUSTED}.get(status, default_code)
    if status in hs.RUNTIME_BROKEN:
        code = DEVICE_UNAVAILABLE
    return RequestError(code, f"{prefix}{reason}")


class ModelRegistry:
    def __init__(self, runtime, max_loaded_models: int, pins: frozenset[str] = frozenset()):
        self.runtime = runtime
        self.max_loaded_models = max_loaded_models
        self.pins = pins
        self._models: dict[str, LoadedModel] = {}
        # Read by the event loop; replaced whole, never mutated.
        self.snapshot: tuple[dict, ...] = ()
        self.total_evictions = 0
        self.last_capacity_event: tuple[str | None, str | None, float | None] = (None, None, None)
        runtime.on_close.append(self.release_all)

    # -- requests -------------------------------------------------------------

    def load(self, spec: ModelSpec, log_fields: dict | None = None) -> tuple[LoadedModel, bool]:
        """The loaded model for ``spec``; True if it was loaded already.

        ``log_fields`` (client pid/uid, request id) go into the log line."""
        model = self._models.get(spec.key)
        if model is not None:
            return model, True
        vdevice = self.runtime.require()
        while len(self._models) >= self.max_loaded_models:
            if not self._evict_one(f"max_loaded_models ({self.max_loaded_models}) reached", spec.key,
                                   log_fields):
                raise RequestError(RESOURCE_EXHAUSTED, f"Failed to load model: max_loaded_models "
                                   f"({self.max_loaded_models}) reached and every loaded model is pinned")
        model = self._load_evicting(spec, vdevice, log_fields)
        self._models[spec.key] = model
        self._publish()
        log.info("loaded %s in %.0f ms", spec.key, model.load_ms,
                 extra={**(log_fields or {}), "MODEL": spec.model_path, "MODEL_TYPE": spec.model_type,
                        "DURATION_MS": round(model.load_ms)})
        return model, False

    def infer(self, spec: ModelSpec, inputs: Any, timeout_ms: int, scope_params: dict,
              log_fields: dict | None = None) -> tuple[Any, float]:
        """Run one inference (loading first if needed); returns (result, run ms)."""
        model, _ = self.load(spec, log_fields)
        started = time.perf_counter()
        try:
            with self.runtime.backend.request_scope(scope_params):
                result = model.handler.run(inputs, timeout_ms)
        except RequestError:
            raise
        except Exception as exc:
            error = _failure("Inference failed: ", exc, INFERENCE_FAILED)
            if hs.status_of(exc) in hs.RUNTIME_BROKEN:
                self.runtime.mark_broken(hs.describe(exc))
            raise error from exc
        finally:
            model.uses += 1
            model.last_used = time.time()
            model.last_used_mono = time.monotonic()
            self._publish()
        return result, (time.perf_counter() - started) * 1000

    def unload(self, model_type: str, model_path: str, log_fields: dict | None = None) -> bool:
        key = f"{model_type}:{model_path}"
        if key in self.pins:
            raise RequestError(FORBIDDEN, f"Model {model_path} is pinned by the configuration (pin:) "
                                          "and cannot be unloaded")
        model = self._models.pop(key, None)
        if model is None:
            return False
        self._release(model)
        self._publish()
        log.info("unloaded %s", model.spec.key,
                 extra={**(log_fields or {}), "MODEL": model_path, "MODEL_TYPE": model_type})
        return True

    def release_all(self) -> None:
        for key in list(self._models):
            self._release(self._models.pop(key))
        self._publish()

    def set_limits(self, max_loaded_models: int, pins: frozenset[str]) -> None:
        """Apply a reloaded config (takes effect at the next load)."""
        self.max_loaded_models = max_loaded_models
        self.pins = pins
        for key, model in self._models.items():
            model.pinned = key in pins
        self._publish()

    # -- internals ------------------------------------------------------------

    def _load_evicting(self, spec: ModelSpec, vdevice: Any, log_fields: dict | None) -> LoadedModel:
        """Load; on RESOURCE_EXHAUSTED evict the LRU model and retry, while any is left."""
        while True:
            handler = spec.handler_cls(self.runtime.platform, vdevice, spec.real_path, spec.params)
            started = time.perf_counter()
            try:
                with self.runtime.backend.request_scope({}):
                    handler.load()
            except RequestError:
                raise
            except Exception as exc:
                status = hs.status_of(exc)
                if status == hs.RESOURCE_EXHAUSTED:
                    self._capacity_event("device memory exhausted (HAILO_RESOURCE_EXHAUSTED)", spec.key)
                    if self._evict_one("device memory exhausted (HAILO_RESOURCE_EXHAUSTED)", spec.key,
                                       log_fields):
                        continue
                if status in hs.RUNTIME_BROKEN:
                    self.runtime.mark_broken(hs.describe(exc))
                raise _failure("Failed to load model: ", exc, LOAD_FAILED) from exc
            now = time.time()
            return LoadedModel(spec, handler, loaded_at=now, last_used=now,
                               last_used_mono=time.monotonic(),
                               load_ms=(time.perf_counter() - started) * 1000,
                               pinned=spec.key in self.pins)

    def _evict_one(self, reason: str, wanted: str, log_fields: dict | None = None) -> bool:
        order = eviction_order(list(self._models.values()))
        if not order:
            return False
        victim = order[0]
        del self._models[victim.spec.key]
        self._release(victim)
        self.total_evictions += 1
        self._capacity_event(reason, wanted)
        self._publish()
        log.info("evicted %s (least recently used) to load %s: %s", victim.spec.key, wanted, reason,
                 extra={**(log_fields or {}), "MODEL": victim.spec.model_path,
                        "MODEL_TYPE": victim.spec.model_type})
        return True

    def _capacity_event(self, reason: str, model_key: str) -> None:
        self.last_capacity_event = (reason, model_key, time.time())

    def _release(self, model: LoadedModel) -> None:
        try:
            model.handler.release()
        except Exception:
            log.exception("releasing %s failed", model.spec.key)

    def _publish(self) -> None:
        self.snapshot = tuple(model.info() for model in self._models.values())
