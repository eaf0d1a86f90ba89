"""HailoRT status numbers: reading them out of exceptions, and what they mean.

HailoRT reports failures three ways (see docs/architecture.md, "HailoRT
errors"): a typed ``HailoRTException`` subclass whose ``__cause__`` carries
the number as ``args[0]``; a plain ``HailoRTException`` with the text
``libhailort failed with error: N (NAME)``; and, from the genai
constructors, a raw status exception whose text is just the number
(``"81"``). This module reads all three and imports nothing of HailoRT, so
it serves the real and the simulated backend alike.
"""
from __future__ import annotations

import re

TIMEOUT = 4
INVALID_OPERATION = 6
OPEN_FILE_FAILURE = 13
INVALID_HEF = 26
DRIVER_OPERATION_FAILED = 36
NOT_FOUND = 61
COMMUNICATION_CLOSED = 62
DEVICE_IN_USE = 73
OUT_OF_PHYSICAL_DEVICES = 74
RPC_FAILED = 77
# Named OUT_OF_HOST_CMA_MEMORY up to 5.2, RESOURCE_EXHAUSTED from 5.3.
RESOURCE_EXHAUSTED = 81
QUEUE_IS_FULL = 82
HEF_NOT_COMPATIBLE_WITH_DEVICE = 93
DEVICE_NOT_CONNECTED = 96
DEVICE_TEMPORARILY_UNAVAILABLE = 97

NAMES = {
    TIMEOUT: "HAILO_TIMEOUT",
    INVALID_OPERATION: "HAILO_INVALID_OPERATION",
    OPEN_FILE_FAILURE: "HAILO_OPEN_FILE_FAILURE",
    INVALID_HEF: "HAILO_INVALID_HEF",
    DRIVER_OPERATION_FAILED: "HAILO_DRIVER_OPERATION_FAILED",
    NOT_FOUND: "HAILO_NOT_FOUND",
    COMMUNICATION_CLOSED: "HAILO_COMMUNICATION_CLOSED",
    DEVICE_IN_USE: "HAILO_DEVICE_IN_USE",
    OUT_OF_PHYSICAL_DEVICES: "HAILO_OUT_OF_PHYSICAL_DEVICES",
    RPC_FAILED: "HAILO_RPC_FAILED",
    RESOURCE_EXHAUSTED: "HAILO_RESOURCE_EXHAUSTED",
    QUEUE_IS_FULL: "HAILO_QUEUE_IS_FULL",
    HEF_NOT_COMPATIBLE_WITH_DEVICE: "HAILO_HEF_NOT_COMPATIBLE_WITH_DEVICE",
    DEVICE_NOT_CONNECTED: "HAILO_DEVICE_NOT_CONNECTED",
    DEVICE_TEMPORARILY_UNAVAILABLE: "HAILO_DEVICE_TEMPORARILY_UNAVAILABLE",
}
_BY_NAME = {name: number for number, name in NAMES.items()}
_BY_NAME["HAILO_OUT_OF_HOST_CMA_MEMORY"] = RESOURCE_EXHAUSTED

# Errors after which the VDevice must be rebuilt.
RUNTIME_BROKEN = frozenset({
    COMMUNICATION_CLOSED, RPC_FAILED, DEVICE_NOT_CONNECTED,
    DEVICE_TEMPORARILY_UNAVAILABLE, DRIVER_OPERATION_FAILED,
})
# The device belongs to another process.
OWNED_ELSEWHERE = frozenset({DEVICE_IN_USE, OUT_OF_PHYSICAL_DEVICES})

_TEXT_NUMBER = re.compile(r"failed with error:\s*(\d+)")
_TEXT_NAME = re.compile(r"\b(HAILO_[A-Z0-9_]+)\b")


def _number_from_args(exc: BaseException) -> int | None:
    if exc.args:
        first = exc.args[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return first
        if isinstance(first, str) and first.strip().isdigit():
            return int(first.strip())
    return None


def status_of(exc: BaseException) -> int | None:
    """The HailoRT status number behind an exception, or None if it has none."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        number = _number_from_args(current)
        if number is not None:
            return number
        text = str(current)
        match = _TEXT_NUMBER.search(text)
        if match:
            return int(match.group(1))
        match = _TEXT_NAME.search(text)
        if match and match.group(1) in _BY_NAME:
            return _BY_NAME[match.group(1)]
        current = current.__cause__ or current.__context__
    return None


def describe(exc: BaseException) -> str:
    """A one-line reason for logs and error responses."""
    number = status_of(exc)
    text = str(exc).strip() or type(exc).__name__
    if number is None:
        return text
    name = NAMES.get(number, "HAILO_STATUS")
    if name in text:
        return text
    if text == str(number):
        return f"{name} ({number})"
    return f"{text} [{name} ({number})]"


def version_tuple(version: object) -> tuple[int, ...]:
    """A HailoRT version as numbers: ``"5.2.0"`` -> (5, 2, 0); () when unknown,
    which sorts below every version."""
    parts = []
    for part in str(version or "").split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


# A failed submit shuts an InferModel's configured model down for good
# (hailort infer_model.cpp:600-604, v5.2.0): too full a queue (82), a buffer
# of the wrong size (6), or a model already shut down (63, STREAM_ABORT).
SHUTS_MODEL_DOWN = frozenset({6, 63, 82})
