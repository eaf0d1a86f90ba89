"""Prompts for genai models: a plain string, or a chat list as HailoRT's genai takes it.

A chat list is ``[{"role": "system"|"user"|"assistant", "content": ...}, ...]``
where ``content`` is a string or a list of parts, ``{"type": "text", "text":
"..."}`` or ``{"type": "image"}`` (one image slot per frame, in order). HailoRT
renders it with the model's own chat template on the host (genai
``minja_wrapper.cpp``) after ``json.dumps`` of each message (``PY:4199-4207``),
so we pass a clean copy of exactly these keys and nothing else.
"""
from __future__ import annotations

from typing import Any

from ...wire.protocol import BAD_REQUEST, RequestError, json_type, shown

MAX_PROMPT_CHARS = 256 * 1024
MAX_MESSAGES = 256
MAX_PARTS = 64
ROLES = ("system", "user", "assistant")


def _bad(message: str) -> RequestError:
    return RequestError(BAD_REQUEST, message)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{where} must be a string, got {json_type(value)}")
    return value


def _part(part: Any, where: str) -> dict:
    if not isinstance(part, dict):
        raise _bad(f"{where} must be an object, got {json_type(part)}")
    kind = part.get("type")
    if kind == "image":
        extra = sorted(set(part) - {"type"})
        if extra:
            raise _bad(f"{where}: an image slot takes no other keys (the frame goes in frames), got {extra}")
        return {"type": "image"}
    if kind == "text":
        return {"type": "text", "text": _text(part.get("text"), f"{where}.text")}
    raise _bad(f'{where}.type must be "text" or "image", got {shown(kind)}')


def _message(message: Any, where: str) -> dict:
    if not isinstance(message, dict):
        raise _bad(f"{where} must be an object with role and content, got {json_type(message)}")
    role = message.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role must be one of {', '.join(ROLES)}, got {shown(role)}")
    content = message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list) or not content:
        raise _bad(f"{where}.content must be a string or a non-empty list of parts, got {json_type(content)}")
    if len(content) > MAX_PARTS:
        raise _bad(f"{where}.content has {len(content)} parts, over the limit of {MAX_PARTS}")
    return {"role": role, "content": [_part(part, f"{where}.content[{index}]") for index, part in enumerate(content)]}


def prompt_field(data: dict, where: str = "input_data", key: str = "prompt") -> str | list[dict]:
    """``data[key]``: a string, or a validated copy of a chat list."""
    prompt = data.get(key)
    if isinstance(prompt, str):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise _bad(f"{where}.{key} is longer than {MAX_PROMPT_CHARS} characters")
        return prompt
    if not isinstance(prompt, list):
        raise _bad(f"{where}.{key} must be a string or a chat list of messages, got {json_type(prompt)}")
    if not prompt:
        raise _bad(f"{where}.{key} is an empty chat list")
    if len(prompt) > MAX_MESSAGES:
        raise _bad(f"{where}.{key} has {len(prompt)} messages, over the limit of {MAX_MESSAGES}")
    messages = [_message(message, f"{where}.{key}[{index}]") for index, message in enumerate(prompt)]
    if sum(len(text) for text in _texts(messages)) > MAX_PROMPT_CHARS:
        raise _bad(f"{where}.{key} holds more than {MAX_PROMPT_CHARS} characters of text")
    return messages


def texts(messages: list[dict]) -> list[str]:
    """The text of every message and text part, in order."""
    return list(_texts(messages))


def _texts(messages: list[dict]):
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            yield content
        else:
            yield from (part["text"] for part in content if part["type"] == "text")


def image_slots(messages: list[dict]) -> int:
    return sum(1 for message in messages if isinstance(message["content"], list)
               for part in message["content"] if part["type"] == "image")


def as_chat(prompt: str | list[dict], frame_count: int, where: str = "input_data") -> list[dict]:
    """The chat list HailoRT gets: a string becomes one user turn with a slot per frame;
    a chat list must have exactly one image slot per frame."""
    if isinstance(prompt, str):
        content = [{"type": "image"} for _ in range(frame_count)]
        content.append({"type": "text", "text": prompt})
        return [{"role": "user", "content": content}]
    slots = image_slots(prompt)
    if slots != frame_count:
        raise _bad(f"{where}.prompt has {slots} image slot(s) ({{\"type\": \"image\"}} parts) but "
                   f"{frame_count} frame(s) were sent: one slot per frame")
    return prompt
