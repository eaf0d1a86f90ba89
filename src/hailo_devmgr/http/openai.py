"""The OpenAI chat completions API on the shared device.

Routes: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST
/v1/chat/completions``. Streaming is server-sent events: ``data:
{chat.completion.chunk}`` lines, a last chunk with ``finish_reason``, with
``stream_options.include_usage`` one more chunk with ``usage`` and no
choices, then ``data: [DONE]``. Images are ``image_url`` parts holding data
URLs (the gateway fetches nothing). Errors are OpenAI's shape: ``{"error":
{"message", "type", "param", "code"}}``.

OpenAI's fields are mapped to Ollama's option names (gateway.device_options
does the rest): ``max_completion_tokens``/``max_tokens`` -> ``num_predict``,
``temperature``, ``top_p``, ``seed``, ``stop``. Accepted and not applied:
``frequency_penalty`` and ``presence_penalty`` (additive penalties the
device has no equivalent of), ``response_format`` (the output is not
constrained), ``logit_bias``, ``user``, ``metadata``. ``n`` > 1 and
``tools`` are refused with a 400.
"""
from __future__ import annotations

import json
import time
import uuid

from aiohttp import web

from . import images
from .catalog import Model
from .gateway import (Chat, Figures, Gateway, GatewayError, bad_request, chat_message, error_middleware,
                      priority_of)
from .ollama import GATEWAY_KEY, read_body

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}
FINGERPRINT = "hailo-devmgr"


def error_body(error: GatewayError) -> dict:
    code = "model_not_found" if error.status == 404 else None
    return {"error": {"message": error.message, "type": error.kind, "param": None, "code": code}}


def error_response(error: GatewayError) -> web.Response:
    headers = {"Retry-After": str(max(1, round(error.retry_after_s)))} if error.retry_after_s else None
    return web.json_response(error_body(error), status=error.status, headers=headers)


def model_object(model: Model) -> dict:
    return {"id": model.name, "object": "model", "created": int(model.file_facts()[1]), "owned_by": "hailo"}


async def models(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    return web.json_response({"object": "list",
                              "data": [model_object(model) for model in gateway.catalog.models().values()]})


async def one_model(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY_KEY]
    return web.json_response(model_object(gateway.model(request.match_info["model"])))


def _text_and_images(content, where: str) -> tuple[str, list]:
    """An OpenAI message's content -> its text and its images (in order)."""
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts")
    texts, pictures = [], []
    for number, part in enumerate(content):
        part_where = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            pictures.append((part_where, images.from_data_url(url, part_where)))
        else:
            raise bad_request(f"{part_where}: want a text or image_url part, got type {kind!r}")
    return "\n".join(texts), pictures


def _chat_messages(model: Model, raw) -> tuple[list, list]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages must be a non-empty list")
    messages, pictures = [], []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with role and content")
        role = {"developer": "system"}.get(message.get("role"), message.get("role"))
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"{where}.role {message.get('role')!r} is not supported (system, developer, user, "
                              "assistant)")
        text, attached = _text_and_images(message.get("content"), where)
        pictures += attached
        messages.append(chat_message(model, role, text, len(attached)))
    return messages, pictures


def _options(body: dict) -> dict:
    options = {}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"), ("stop", "stop")):
        if body.get(theirs) is not None:
            options[ours] = body[theirs]
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        options["num_predict"] = limit
    return options


def _usage(figures: Figures) -> dict:
    return {"prompt_tokens": figures.prompt_tokens, "completion_tokens": figures.generated_tokens,
            "total_tokens": figures.prompt_tokens + figures.generated_tokens}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway: Gateway = request.app[GATEWAY_KEY]
    body = await read_body(request)
    model = gateway.model(body.get("model"))
    if body.get("tools"):
        raise bad_request(f"model '{model.name}' does not support tools")
    if body.get("n") not in (None, 1):
        raise bad_request("n must be 1: the device makes one answer per request")
    stream = body.get("stream") is True
    include_usage = stream and isinstance(body.get("stream_options"), dict) and \
        body["stream_options"].get("include_usage") is True
    messages, pictures = _chat_messages(model, body.get("messages"))
    raw = body.get("messages")
    priority = priority_of(request.headers, raw)
    run = await gateway.start(Chat(model=model, messages=messages, images=pictures, options=_options(body),
                                   keep_alive=gateway.effective_keep_alive(model, model.keep_alive),
                                   priority=priority))
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": ident, "created": created, "model": model.name, "system_fingerprint": FINGERPRINT}
    if not stream:
        text, figures = await run.whole()
        return web.json_response({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text or figures.text},
            "logprobs": None, "finish_reason": FINISH_REASONS.get(figures.done_reason, "stop")}],
            "usage": _usage(figures)})

    def event(choices: list, **extra) -> bytes:
        chunk = {**head, "object": "chat.completion.chunk", "choices": choices, **extra}
        if include_usage:
            chunk.setdefault("usage", None)
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def delta(content: dict, finish=None) -> list:
        return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    async with run.streaming():
        await response.prepare(request)
        await response.write(event(delta({"role": "assistant", "content": ""})))
        try:
            async for piece in run:
                await response.write(event(delta({"content": piece})))
        except GatewayError as error:
            await response.write(b"data: " + json.dumps(error_body(error)).encode() + b"\n\n")
        else:
            figures = await run.figures()
            await response.write(event(delta({}, FINISH_REASONS.get(figures.done_reason, "stop"))))
            if include_usage:
                await response.write(event([], usage=_usage(figures)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    return response


# Errors under /v1/ in OpenAI's shape.
openai_errors = error_middleware(
    lambda request: request.path.startswith("/v1/"), lambda error: error_response(error),
    lambda request, exc: f"{request.method} {request.path}: {exc.reason}")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", one_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
