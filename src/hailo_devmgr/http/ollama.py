"""The Ollama REST API on the shared device, with Ollama's own field names.

Routes: ``GET|HEAD /`` ("Ollama is running"), ``GET|HEAD /api/version``,
``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``, ``POST /api/chat``,
``POST /api/generate``. Answers stream as NDJSON (one JSON object a line)
unless the request says ``"stream": false``; the last object has ``done:
true``, ``done_reason`` and the figures in nanoseconds (``total_duration``,
``load_duration``, ``prompt_eval_count``, ``prompt_eval_duration``,
``eval_count``, ``eval_duration``). An empty ``messages`` list or ``prompt``
loads the model (``done_reason: "load"``), and with ``keep_alive: 0``
unloads it (``"unload"``). Errors are ``{"error": "..."}`` with the status;
an error after the first line is one more line ``{"error": "..."}``.

Not served (404 with a message): embeddings (no embedding model runs on the
device through this gateway), and pull/push/create/copy/delete (models come
from the catalog, see catalog.py).
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from aiohttp import web

from . import images
from .catalog import Model
from .gateway import (Chat, Figures, Gateway, GatewayError, Run, bad_request, chat_message, error_middleware,
                      priority_of)

# The Ollama API level whose fields this gateway answers with (what /api/version says).
OLLAMA_API_VERSION = "0.6.0"
GATEWAY_KEY = web.AppKey("gateway", Gateway) if hasattr(web, "AppKey") else "gateway"
NDJSON = "application/x-ndjson"


def now() -> str:
    """RFC 3339 in UTC with nanoseconds' worth of digits, as Ollama writes ``created_at``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def error_response(error: GatewayError) -> web.Response:
    headers = {"Retry-After": str(max(1, round(error.retry_after_s)))} if error.retry_after_s else None
    return web.json_response({"error": error.message}, status=error.status, headers=headers)


async def read_body(request: web.Request) -> dict:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise bad_request(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def digest(model: Model) -> str:
    """Names the catalog entry and its file's version (not a hash of the HEF's gigabytes)."""
    size, mtime = model.file_facts()
    return hashlib.sha256(f"{model.path}\0{size}\0{mtime}".encode()).hexdigest()


def details(model: Model) -> dict:
    extra = model.details
    return {"parent_model": "", "format": "hef", "family": str(extra.get("family") or model.kind),
            "families": [str(extra.get("family") or model.kind)],
            "parameter_size": str(extra.get("parameter_size") or ""),
            "quantization_level": str(extra.get("quantization_level") or "")}


def listing(model: Model) -> dict:
    size, mtime = model.file_facts()
    modified = datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"name": model.name, "model": model.name, "modified_at": modified, "size": size,
            "digest": digest(model), "details": details(model)}


def capabilities(model: Model) -> list[str]:
    return ["completion", "vision"] if model.kind == "vlm" else ["completion"]


def final_fields(figures: Figures) -> dict:
    return {"done": True, "done_reason": figures.done_reason, "total_duration": figures.total_ns,
            "load_duration": figures.load_ns, "prompt_eval_count": figures.prompt_tokens,
            "prompt_eval_duration": figures.prompt_ns, "eval_count": figures.generated_tokens,
            "eval_duration": figures.eval_ns}


# -- read-only routes ---------------------------------------------------------------------------

async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_API_VERSION})


async def tags(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    return web.json_response({"models": [listing(model) for model in gateway.catalog.models().values()]})


async def show(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await read_body(request)
    model = gateway.model(body.get("model") or body.get("name"))
    size, mtime = model.file_facts()
    info = {"general.architecture": f"hailo.{model.kind}", "general.basename": model.name.split(":")[0],
            "general.file_type": "hef", "hailo.hef_path": model.path, "hailo.model_type": model.model_type,
            "hailo.source": model.source}
    loaded = (await gateway.loaded()).get(model.path)
    if model.kind == "vlm" and (model.frame_size or gateway.known_frame_size(model)):
        info["hailo.frame_size"] = list(model.frame_size or gateway.known_frame_size(model))
    parameters = "\n".join(f"{key} {json.dumps(value) if not isinstance(value, str) else value}"
                           for key, value in sorted(model.options.items()))
    answer = {"license": "", "modelfile": f"# from the hailo-devmgr catalog ({model.source})\nFROM {model.path}\n",
              "parameters": parameters, "template": "", "details": details(model), "model_info": info,
              "capabilities": capabilities(model),
              "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")}
    if loaded:
        answer["model_info"]["hailo.loaded"] = True
    return web.json_response(answer)


async def ps(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    loaded = await gateway.loaded()
    models = []
    for model in gateway.catalog.models().values():
        entry = loaded.get(model.path)
        if entry is None:
            continue
        expires = entry.get("expires_at")
        expires_at = (datetime.fromtimestamp(expires, timezone.utc) if isinstance(expires, (int, float))
                      else datetime(9999, 12, 31, tzinfo=timezone.utc)).isoformat().replace("+00:00", "Z")
        size = model.file_facts()[0]
        models.append({"name": model.name, "model": model.name, "size": size, "digest": digest(model),
                       "details": details(model), "expires_at": expires_at, "size_vram": size})
        loaded.pop(model.path)   # one line per file, under its first name
    return web.json_response({"models": models})


async def not_served(request: web.Request) -> web.Response:
    path = request.path
    if "embed" in path:
        message = ("embeddings are not served by the hailo-devmgr gateway: no embedding model runs on the "
                   "device through it (CLIP and other encoders are on the device socket)")
    else:
        message = (f"{path} is not served by the hailo-devmgr gateway: models are listed in its catalog "
                   "(/etc/hailo/models.yaml), not pulled, created or deleted over HTTP")
    return web.json_response({"error": message}, status=404)


# -- generation -----------------------------------------------------------------------------------

def _messages(model: Model, raw_messages) -> tuple[list, list]:
    """Ollama's messages -> the daemon's chat list and the images (in slot order)."""
    if not isinstance(raw_messages, list):
        raise bad_request("messages must be a list")
    messages, pictures = [], []
    for index, message in enumerate(raw_messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{index}] must be an object with role and content")
        role, content = message.get("role"), message.get("content") or ""
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"messages[{index}].role {role!r} is not supported (system, user, assistant; "
                              "tool results need a model with tools)")
        if not isinstance(content, str):
            raise bad_request(f"messages[{index}].content must be a string")
        attached = message.get("images") or []
        if not isinstance(attached, list):
            raise bad_request(f"messages[{index}].images must be a list of base64 strings")
        for number, item in enumerate(attached):
            where = f"messages[{index}].images[{number}]"
            pictures.append((where, images.from_base64(item, where)))
        messages.append(chat_message(model, role, content, len(attached)))
    return messages, pictures


def _check_tools(model: Model, body: dict) -> None:
    if body.get("tools"):
        raise bad_request(f"model '{model.name}' does not support tools")


async def _load_or_unload(gateway: Gateway, model: Model, keep_alive, priority: str) -> str:
    if keep_alive == 0:
        await gateway.unload(model)
        return "unload"
    await gateway.load(model, keep_alive, priority)
    return "load"


async def _answer(request: web.Request, run: Run, line, final) -> web.StreamResponse:
    """Stream NDJSON lines, or one object when the body said ``stream: false``."""
    if not request["stream"]:
        text, figures = await run.whole()
        return web.json_response(final(figures, text or figures.text))
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    async with run.streaming():
        await response.prepare(request)
        try:
            async for piece in run:
                await response.write(json.dumps(line(piece)).encode() + b"\n")
        except GatewayError as error:
            await response.write(json.dumps({"error": error.message}).encode() + b"\n")
        else:
            await response.write(json.dumps(final(await run.figures(), "")).encode() + b"\n")
        await response.write_eof()
    return response


def _stream_flag(body: dict) -> bool:
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false")
    return stream


async def chat(request: web.Request) -> web.StreamResponse:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await read_body(request)
    model = gateway.model(body.get("model"))
    request["stream"] = _stream_flag(body)
    keep_alive = gateway.effective_keep_alive(model, body.get("keep_alive"))
    raw_messages = body.get("messages")
    priority = priority_of(request.headers, raw_messages if isinstance(raw_messages, list) else [])
    _check_tools(model, body)
    if not raw_messages:
        reason = await _load_or_unload(gateway, model, keep_alive, priority)
        return web.json_response({"model": model.name, "created_at": now(),
                                  "message": {"role": "assistant", "content": ""}, "done_reason": reason,
                                  "done": True})
    messages, pictures = _messages(model, raw_messages)
    run = await gateway.start(Chat(model=model, messages=messages, images=pictures,
                                   options=body.get("options") or {}, keep_alive=keep_alive, priority=priority))

    def line(piece: str) -> dict:
        return {"model": model.name, "created_at": now(), "message": {"role": "assistant", "content": piece},
                "done": False}

    def final(figures: Figures, text: str) -> dict:
        return {"model": model.name, "created_at": now(), "message": {"role": "assistant", "content": text},
                **final_fields(figures)}
    return await _answer(request, run, line, final)


async def generate(request: web.Request) -> web.StreamResponse:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await read_body(request)
    model = gateway.model(body.get("model"))
    request["stream"] = _stream_flag(body)
    keep_alive = gateway.effective_keep_alive(model, body.get("keep_alive"))
    prompt, system = body.get("prompt") or "", body.get("system") or ""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise bad_request("prompt and system must be strings")
    attached = body.get("images") or []
    user = {"role": "user", "content": prompt, "images": attached}
    priority = priority_of(request.headers, [user])
    if not prompt and not attached:
        reason = await _load_or_unload(gateway, model, keep_alive, priority)
        return web.json_response({"model": model.name, "created_at": now(), "response": "", "done": True,
                                  "done_reason": reason})
    raw = body.get("raw") is True and model.kind == "llm" and not attached
    if raw:
        chat_request = Chat(model=model, prompt=prompt)
    else:
        messages, pictures = _messages(model, ([{"role": "system", "content": system}] if system else []) + [user])
        chat_request = Chat(model=model, messages=messages, images=pictures)
    chat_request.options, chat_request.keep_alive = body.get("options") or {}, keep_alive
    chat_request.priority = priority
    run = await gateway.start(chat_request)

    def line(piece: str) -> dict:
        return {"model": model.name, "created_at": now(), "response": piece, "done": False}

    def final(figures: Figures, text: str) -> dict:
        return {"model": model.name, "created_at": now(), "response": text, **final_fields(figures)}
    return await _answer(request, run, line, final)


# Errors of every route but OpenAI's (/v1/, which answers in its own shape).
ollama_errors = error_middleware(
    lambda request: not request.path.startswith("/v1/"), lambda error: error_response(error),
    lambda request, exc: exc.reason if exc.status != 404 else f"{request.path} not found")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)            # add_get adds HEAD too
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_post("/api/show", show)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    for path in ("/api/embed", "/api/embeddings", "/api/pull", "/api/push", "/api/create", "/api/copy"):
        app.router.add_post(path, not_served)
    app.router.add_delete("/api/delete", not_served)
