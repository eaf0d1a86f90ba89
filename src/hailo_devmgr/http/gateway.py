"""What the Ollama and OpenAI front ends share: a chat turned into a device request.

The two API modules (ollama.py, openai.py) parse their clients' JSON into a
:class:`Chat` (the catalog's model, the daemon's ``input_data``, images as
frames, keep-alive, priority), then run it here and format what comes back.
This module owns:

- the option names: Ollama's ``options`` (OpenAI's fields are mapped to them
  first) to the daemon's ``llm`` / ``vlm_chat`` inputs;
- Ollama's ``keep_alive`` (seconds, ``"5m"``, ``"1h30m"``, negative: forever);
- which requests are background work (``batch``): Open WebUI's title, tag
  and follow-up requests, recognised by the ``### Task:`` heading its task
  prompts start with (Open WebUI drops its ``metadata.task`` before it calls
  Ollama, so the prompt is all the gateway sees); a request may also say
  ``X-Hailo-Priority: batch|normal|interactive``; everything else is a chat
  someone waits for (``interactive``);
- the daemon's errors as HTTP statuses (:func:`http_error`);
- :class:`Run`: one generation, its first piece awaited before any HTTP
  header is written (so a refusal is a proper 4xx/5xx), then the pieces,
  then the figures; closing it early cancels the generation on the device.

It knows nothing of aiohttp but the executor it decodes images in.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from dataclasses import dataclass, field

from aiohttp import web

from ..client import AsyncClient, DeviceError
from ..client.library import ConnectionLost, NotConnected, RequestTimeout
from ..wire import protocol as p
from . import images
from .catalog import Catalog, Model

MAX_GENERATED_TOKENS = 8192          # the llm handler's bound (docs/protocol.md 9.9)
MAX_STOP_STRINGS = 16
log = logging.getLogger(__name__)
MAX_KEEP_ALIVE_S = 10 * 365 * 86400.0
PRIORITIES = ("interactive", "normal", "batch")
# Open WebUI's task prompts (title, tags, follow-ups, queries, ...) start with this heading.
BACKGROUND_TASK_HEADING = "### Task:"
PRIORITY_HEADER = "X-Hailo-Priority"


class GatewayError(Exception):
    """An answer other than 200: ``status``, the message, and a short ``kind`` for OpenAI's ``type``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.retry_after_s = status, message, kind, retry_after_s


def not_found(name) -> GatewayError:
    return GatewayError(404, f"model '{name}' not found", "not_found_error")


def bad_request(message: str) -> GatewayError:
    return GatewayError(400, message)


# The daemon's error codes -> HTTP status (docs/protocol.md section 7).
_STATUS = {p.BAD_REQUEST: 400, p.TOO_LARGE: 413, p.MODEL_NOT_FOUND: 404, p.FORBIDDEN: 403,
           p.UNSUPPORTED_MODEL_TYPE: 400, p.BUSY: 503, p.TIMEOUT: 503, p.DEVICE_UNAVAILABLE: 503,
           p.DEVICE_LENT: 503, p.SHUTTING_DOWN: 503, p.OVERHEATED: 503, p.RESOURCE_EXHAUSTED: 503,
           p.CANCELLED: 499}


def http_error(exc: Exception) -> GatewayError:
    """What to answer for an exception from the client library."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, DeviceError):
        status = _STATUS.get(exc.code, 500)
        retry = exc.retry_after_ms / 1000 if isinstance(exc.retry_after_ms, (int, float)) else None
        if status == 503 and retry is None:
            retry = 1.0
        kind = "invalid_request_error" if status < 500 else "server_error"
        return GatewayError(status, f"{exc.message} ({exc.code})" if exc.code else exc.message, kind, retry)
    if isinstance(exc, NotConnected):
        return GatewayError(503, f"device manager unavailable: {exc}", "server_error", 1.0)
    if isinstance(exc, (ConnectionLost, RequestTimeout, ConnectionError, TimeoutError)):
        return GatewayError(502, f"the device manager did not answer: {exc or type(exc).__name__}", "server_error")
    return GatewayError(500, f"{type(exc).__name__}: {exc}", "server_error")


def chat_message(model: Model, role: str, text: str, image_count: int) -> dict:
    """One chat message as the device takes it: for a VLM, an image slot per
    picture (the frames go apart, in order), then the text."""
    if model.kind != "vlm":
        return {"role": role, "content": text}
    parts = [{"type": "image"} for _ in range(image_count)] + ([{"type": "text", "text": text}] if text else [])
    return {"role": role, "content": parts or [{"type": "text", "text": ""}]}


def error_middleware(applies, respond, http_message):
    """An aiohttp middleware for the routes ``applies(request)`` accepts: every
    failure answered as ``respond(GatewayError)`` (Ollama's shape or OpenAI's);
    aiohttp's own errors (404, 405) with ``http_message(request, exc)``. A
    client gone (ConnectionError) is not ours to answer."""
    @web.middleware
    async def middleware(request: web.Request, handler):
        if not applies(request):
            return await handler(request)
        try:
            return await handler(request)
        except GatewayError as error:
            return respond(error)
        except images.ImageError as exc:
            return respond(bad_request(str(exc)))
        except web.HTTPException as exc:
            if exc.status >= 400:
                return respond(GatewayError(exc.status, http_message(request, exc)))
            raise
        except ConnectionError:
            raise
        except Exception as exc:
            log.exception("request %s %s failed", request.method, request.path)
            return respond(http_error(exc))
    return middleware


_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value) -> float | None:
    """Ollama's ``keep_alive`` in seconds: None (not given), 0 (unload after), -1 (forever) or > 0."""
    if value is None:
        return None
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)       # "300": seconds, as Ollama takes it
        except ValueError:
            parts = _GO_DURATION.findall(body)
            if parts and "".join(number + unit for number, unit in parts) == body:
                seconds = sign * sum(float(number) * _UNIT_S[unit] for number, unit in parts)
    if seconds is None:
        raise bad_request(f'time: invalid duration "{value}"')
    if seconds < 0:
        return -1.0
    return min(seconds, MAX_KEEP_ALIVE_S)


def _number(options: dict, name: str, integer: bool = False):
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"option {name} must be a number, got {value!r}")
    if integer and value != int(value):
        raise bad_request(f"option {name} must be an integer, got {value!r}")
    return int(value) if integer else float(value)


def device_options(options: dict, kind: str) -> dict:
    """Ollama ``options`` -> the daemon's inputs for an ``llm`` (all) or ``vlm_chat`` (fewer).

    Left out, as the device cannot do them: num_ctx (the HEF fixes the
    context), presence/frequency_penalty in OpenAI's additive sense,
    mirostat, tfs_z, typical_p, num_keep, num_gpu, ...; they are accepted and
    ignored, as Ollama ignores what a runner does not use."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise bad_request("options must be an object")
    out: dict = {}
    temperature = _number(options, "temperature")
    if temperature is not None:
        out["temperature"] = min(max(temperature, 0.0), 100.0)
    seed = _number(options, "seed", integer=True)
    if seed is not None and seed >= 0:   # Ollama's -1: a random seed, i.e. none
        out["seed"] = seed % (2**31 - 1 if kind == "vlm" else 4294967295)
    predict = _number(options, "num_predict", integer=True)
    if predict is not None:
        # -1 (until the model stops) and -2 (fill the context): the device's maximum.
        out["max_generated_tokens"] = MAX_GENERATED_TOKENS if predict < 0 else min(max(predict, 1),
                                                                                    MAX_GENERATED_TOKENS)
    if kind == "vlm":
        return out
    top_p = _number(options, "top_p")
    if top_p is not None and 0 < top_p <= 1:
        out["top_p"] = top_p
    top_k = _number(options, "top_k", integer=True)
    if top_k is not None and top_k >= 1:
        out["top_k"] = min(top_k, 100000)
    penalty = _number(options, "repeat_penalty")
    if penalty is not None and 0 < penalty <= 100:
        out["frequency_penalty"] = penalty     # HailoRT's repetition penalty: 1 is none, as Ollama's
    stop = options.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(item, str) for item in stop):
            raise bad_request("option stop must be a list of strings")
        stop = [item for item in stop if item][:MAX_STOP_STRINGS]
        if stop:
            out["stop"] = stop
    return out


def priority_of(headers, messages) -> str:
    """``batch`` for Open WebUI's background tasks, the header's class when given, else ``interactive``."""
    asked = (headers.get(PRIORITY_HEADER) or "").strip().lower()
    if asked in PRIORITIES:
        return asked
    users = [message for message in messages or () if isinstance(message, dict) and message.get("role") == "user"]
    if users:
        content = users[-1].get("content")
        text = content if isinstance(content, str) else " ".join(
            part.get("text", "") for part in content or () if isinstance(part, dict)
            and isinstance(part.get("text"), str)) if isinstance(content, list) else ""
        if text.lstrip().startswith(BACKGROUND_TASK_HEADING):
            return "batch"
    return "interactive"


@dataclass
class Chat:
    """One generation as the daemon will get it."""
    model: Model
    messages: list | None = None          # [{role, content: str | [parts]}], images as {"type": "image"} parts
    prompt: str | None = None             # raw, no template (llm only)
    images: list = field(default_factory=list)   # (where, encoded bytes), in the order of the image parts
    options: dict = field(default_factory=dict)  # Ollama names, the catalog's defaults under the request's
    keep_alive: float | None = None
    priority: str = "interactive"


@dataclass
class Figures:
    """The statistics of a finished generation, in nanoseconds as Ollama counts."""
    text: str = ""
    done_reason: str = "stop"
    prompt_tokens: int = 0
    generated_tokens: int = 0
    total_ns: int = 0
    load_ns: int = 0
    prompt_ns: int = 0
    eval_ns: int = 0


def _ms_to_ns(value) -> int:
    return int(round(float(value) * 1e6)) if isinstance(value, (int, float)) else 0


class Gateway:
    """The catalog and one connection to the daemon, shared by every HTTP request."""

    def __init__(self, client: AsyncClient, catalog: Catalog):
        self.client = client
        self.catalog = catalog
        self._frame_sizes: dict[str, tuple[int, int]] = {}   # by model file, from load answers

    def model(self, name) -> Model:
        if not isinstance(name, str) or not name.strip():
            raise bad_request("model is required")
        model = self.catalog.find(name)
        if model is None:
            raise not_found(name)
        return model

    async def loaded(self) -> dict[str, dict]:
        """The daemon's loaded models by path (its ``status``)."""
        try:
            status = await self.client.status()
        except Exception as exc:
            raise http_error(exc) from None
        return {entry["model_path"]: entry for entry in status.get("loaded_models") or []
                if isinstance(entry, dict) and "model_path" in entry}

    async def load(self, model: Model, keep_alive: float | None, priority: str) -> None:
        try:
            await self.client.load_model(model.path, model.model_type, keep_alive=keep_alive, priority=priority)
        except Exception as exc:
            raise http_error(exc) from None

    async def unload(self, model: Model) -> None:
        try:
            await self.client.unload_model(model.path, model.model_type)
        except DeviceError as exc:
            if exc.code != p.MODEL_NOT_FOUND:
                raise http_error(exc) from None
        except Exception as exc:
            raise http_error(exc) from None

    def effective_keep_alive(self, model: Model, asked) -> float | None:
        value = keep_alive_seconds(asked)
        return value if value is not None else keep_alive_seconds(model.keep_alive)

    async def input_data(self, chat: Chat) -> dict:
        """The daemon's ``input_data`` for ``chat`` (images decoded off the event loop)."""
        options = device_options({**chat.model.options, **chat.options}, chat.model.kind)
        if chat.model.kind == "llm":
            if chat.images:
                raise bad_request(f"model '{chat.model.name}' does not support images (it is an llm; "
                                  "use a vlm model from the catalog)")
            body = {"prompt": chat.prompt} if chat.prompt is not None else {"messages": chat.messages}
            return {**body, **options}
        if not chat.images:
            raise bad_request(f"model '{chat.model.name}' is a vision model and needs at least one image "
                              "(the device's VLM takes one or more frames with every question)")
        if len(chat.images) > images.MAX_IMAGES:
            raise bad_request(f"at most {images.MAX_IMAGES} images in one request, got {len(chat.images)}")
        size = chat.model.frame_size or await self.frame_size(chat)
        loop = asyncio.get_running_loop()
        frames = [await loop.run_in_executor(None, images.to_frame, data, size, where)
                  for where, data in chat.images]
        return {"prompt": chat.messages, "frames": frames, **options}

    def known_frame_size(self, model: Model) -> tuple[int, int] | None:
        """The frame size a load of this model said, if one did."""
        return self._frame_sizes.get(model.path)

    async def frame_size(self, chat: Chat) -> tuple[int, int]:
        """(height, width) of the frames a VLM takes, as its load answer says
        (loading it now: the generation would anyway); kept per model file."""
        size = self._frame_sizes.get(chat.model.path)
        if size is None:
            try:
                answer = await self.client.load_model(chat.model.path, chat.model.model_type,
                                                      keep_alive=chat.keep_alive, priority=chat.priority)
                shape = answer["model_info"]["frame_shape"]
                size = self._frame_sizes[chat.model.path] = (int(shape[0]), int(shape[1]))
            except (KeyError, TypeError, ValueError, IndexError):
                raise GatewayError(502, f"the device manager did not say the frame size of "
                                        f"'{chat.model.name}': set frame_size in the catalog", "server_error")
            except Exception as exc:
                raise http_error(exc) from None
        return size

    async def start(self, chat: Chat) -> "Run":
        """Send the generation; returns once the first piece (or the end) came, so errors come first."""
        started = time.monotonic()
        input_data = await self.input_data(chat)
        generation = self.client.generate(chat.model.path, input_data, chat.model.model_type,
                                          keep_alive=chat.keep_alive, priority=chat.priority)
        run = Run(self, chat, generation, started)
        await run.begin()
        return run


class Run:
    """One generation in flight: ``first``, then ``async for piece in run``, then ``figures``."""

    def __init__(self, gateway: Gateway, chat: Chat, generation, started: float):
        self.gateway, self.chat, self.generation = gateway, chat, generation
        self.started = started
        self._pieces = generation.__aiter__()
        self.first: str | None = None
        self.ended = False
        self.first_at: float | None = None

    async def begin(self) -> None:
        try:
            self.first = await self._pieces.__anext__()
            self.first_at = time.monotonic()
        except StopAsyncIteration:
            self.ended = True
        except BaseException as exc:
            await self.close()
            if isinstance(exc, Exception):
                raise http_error(exc) from None
            raise

    def __aiter__(self):
        return self._rest()

    async def _rest(self):
        if self.first:
            yield self.first
        if self.ended:
            return
        while True:
            try:
                piece = await self._pieces.__anext__()
            except StopAsyncIteration:
                self.ended = True
                return
            except Exception as exc:
                self.ended = True
                raise http_error(exc) from None
            yield piece

    async def close(self) -> None:
        """Stop reading; a generation still running is cancelled on the device."""
        await self._pieces.aclose()

    async def whole(self) -> tuple[str, "Figures"]:
        """All the text at once (``stream: false``), with the statistics."""
        try:
            text = "".join([piece async for piece in self])
            return text, await self.figures()
        finally:
            await self.close()

    @contextlib.asynccontextmanager
    async def streaming(self):
        """Around writing the pieces to an HTTP client: one that leaves
        mid-stream is no error of ours, and its generation is cancelled."""
        try:
            yield
        except ConnectionError:
            log.info("client left mid-stream; the generation is cancelled")
        finally:
            await self.close()

    async def figures(self) -> Figures:
        """The final answer's statistics (after the last piece)."""
        answer = self.generation.result or {}
        result = answer.get("result") if isinstance(answer.get("result"), dict) else {}
        total_ns = int((time.monotonic() - self.started) * 1e9)
        load_ns = _ms_to_ns(answer.get("load_time_ms"))   # there when this request loaded the model
        text = result.get("text") if isinstance(result.get("text"), str) else (
            answer.get("result") if isinstance(answer.get("result"), str) else "")
        return Figures(text=text, done_reason=str(result.get("done_reason") or "stop"),
                       prompt_tokens=int(result.get("prompt_tokens") or 0),
                       generated_tokens=int(result.get("generated_tokens") or 0),
                       total_ns=total_ns, load_ns=load_ns, prompt_ns=_ms_to_ns(result.get("prompt_ms")),
                       eval_ns=_ms_to_ns(result.get("generation_ms")))
