"""The device socket's wire format, as a pure codec.

Rules of this module:
- It knows nothing of sockets or asyncio: bytes go in, messages come out,
  and the other way round. Frames are cut by codec.py (the one frame
  reader); this module has the header format and the message rules.
- Every error a client can cause is a :class:`RequestError` carrying the
  machine ``code`` and the human message to answer with; the server turns
  it into an error response in one place.
- v1 is a compatibility contract (see docs/protocol.md): the messages and
  texts marked "v1 text" below are matched by existing services. Change
  them never.
"""
from __future__ import annotations

import json
import math
import reprlib
import struct
from dataclasses import dataclass
from typing import Any

# Framing: 4-byte unsigned big-endian length, then that many bytes of JSON.
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

PROTOCOL_VERSION = 1   # what a connection speaks until it says hello
PROTOCOL_MAX = 2       # the newest this daemon speaks
# What a v2 connection may use (listed in the hello answer).
FEATURES_V2 = ("pipelining", "priority", "timeout", "cancel", "metrics", "attachments", "shm",
               "shm_buffers")

# Error codes (the `code` field of an error response).
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
UNKNOWN_ACTION = "unknown_action"
UNSUPPORTED_MODEL_TYPE = "unsupported_model_type"
MODEL_NOT_FOUND = "model_not_found"
FORBIDDEN = "forbidden"
LOAD_FAILED = "load_failed"
INFERENCE_FAILED = "inference_failed"
RESOURCE_EXHAUSTED = "resource_exhausted"
BUSY = "busy"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
DEVICE_UNAVAILABLE = "device_unavailable"
DEVICE_LENT = "device_lent"
SHUTTING_DOWN = "shutting_down"
OVERHEATED = "overheated"
INTERNAL_ERROR = "internal_error"

# Actions answered by the event loop at once (never queued behind the device).
CONTROL_ACTIONS = frozenset({"ping", "status", "device_status", "hello", "cancel", "metrics",
                             "register_buffer", "unregister_buffer"})
# Actions that need the device thread.
DEVICE_ACTIONS = frozenset({"load_model", "infer", "unload_model"})
# Lending the whole device to another program (admins only; see daemon/lending.py).
ADMIN_ACTIONS = frozenset({"lend", "reclaim"})
# Test hooks of the simulated backend (root or the daemon's user only; see simulate.py).
DEBUG_ACTIONS = frozenset({"simulate"})
ACTIONS = CONTROL_ACTIONS | DEVICE_ACTIONS | ADMIN_ACTIONS | DEBUG_ACTIONS

DEFAULT_MODEL_TYPE = "vlm"  # v1 default for load_model/infer/unload_model

# Bounds on client text in what the daemon writes: a client value quoted in a
# message, a whole error message (answered, logged, kept as last_error), and a
# request_id (echoed in every answer and logged with every line about the request).
MAX_SHOWN_CHARS = 60
MAX_ERROR_CHARS = 1024
MAX_REQUEST_ID_CHARS = 256


class RequestError(Exception):
    """Something the client asked for cannot be done; answered, not fatal.

    ``message`` is what the client reads in ``error``; ``code`` is one of the
    constants above. ``fatal`` means the connection must be closed after the
    answer because the framing can no longer be trusted. ``field`` names the
    request field at fault where the v1 text itself cannot.
    """

    def __init__(self, code: str, message: str, *, retry_after_ms: int | None = None,
                 fatal: bool = False, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.fatal = fatal
        self.field = field


# ---------------------------------------------------------------- framing

def encode_json(message: dict) -> bytes:
    """A message's JSON body: compact, UTF-8, no NaN or Infinity."""
    return _encode(message).encode("utf-8")


def encode_frame(message: dict) -> bytes:
    """One message as it goes on the wire."""
    body = encode_json(message)
    return HEADER.pack(len(body)) + body


def parse_length(header: bytes, max_message_bytes: int) -> int:
    """Length of the body announced by a 4-byte header; checks the limit.

    Raises a fatal ``too_large`` error before any body byte is read, so a
    hostile length never makes us allocate it.
    """
    (length,) = HEADER.unpack(header)
    if length > max_message_bytes:
        raise RequestError(
            TOO_LARGE,
            f"Message of {length} bytes exceeds the limit of {max_message_bytes} bytes",
            fatal=True,
        )
    return length


# ---------------------------------------------------------------- messages

@dataclass
class Request:
    """A decoded, minimally validated request."""

    action: str
    body: dict
    request_id: Any = None
    has_request_id: bool = False
    size: int = 0   # bytes of its JSON as received (0: built in-process)


def _not_json(constant: str):
    raise ValueError(f"{constant} is not valid JSON")


# Made once: json.dumps and json.loads build a new coder per call when given options.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def _one_shot(encoder: json.JSONEncoder):
    """``encoder.encode`` less its two Python-level calls per message (a small
    answer's encoding is mostly those): the C encoder made directly, as
    ``iterencode`` makes it for a one-shot encode, a new one each time (its
    cycle markers start empty). The stdlib's ``encode`` itself where the C
    accelerator is missing or is not called this way (checked once, here)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    args = (encoder.default, json.encoder.encode_basestring_ascii, None, encoder.key_separator,
            encoder.item_separator, encoder.sort_keys, encoder.skipkeys, encoder.allow_nan)

    def encode(message) -> str:
        return "".join(make({}, *args)(message, 0))

    probe = {"a": [1, -2.5, "é\u2603\n", None, True, False], "b": {"c": 10 ** 20}}
    try:
        if encoder.ensure_ascii and make is not None and encode(probe) == encoder.encode(probe) \
                and _refuses_nan(encode) == _refuses_nan(encoder.encode):
            return encode
    except (TypeError, ValueError):
        pass
    return encoder.encode


def _refuses_nan(encode) -> bool:
    try:
        encode({"x": float("nan")})
    except ValueError:
        return True
    return False


_encode = _one_shot(_ENCODER)
_scan = _DECODER.scan_once


def _decode(text: str):
    """``_DECODER.decode``, with the usual body (an object, nothing around it)
    scanned at once: an error in it raises from that one scan, as ``decode``
    would raise it. Anything else goes the stdlib's way."""
    if text[:1] == "{" and text[-1:] == "}":
        try:
            message, end = _scan(text, 0)
        except StopIteration:   # (not at an object's start; raw_decode's one rewording)
            pass
        else:   # any other error is raised as decode raises it: parsed once, not twice
            if end == len(text):
                return message
    return _DECODER.decode(text)


def decode_body(body: bytes) -> dict:
    """JSON body → dict. Raises ``bad_request`` for anything else."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(BAD_REQUEST, f"Message is not valid UTF-8: {exc.reason} at byte {exc.start}")
    try:
        message = _decode(text)
    except json.JSONDecodeError as exc:
        raise RequestError(BAD_REQUEST, f"Invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    except RecursionError:
        raise RequestError(BAD_REQUEST, "Invalid JSON: nested too deeply")
    except ValueError as exc:  # NaN/Infinity, or an integer literal past Python's digit limit
        raise RequestError(BAD_REQUEST, f"Invalid JSON: {exc}")
    if not isinstance(message, dict):
        raise RequestError(BAD_REQUEST, f"Message must be a JSON object, got {json_type(message)}")
    return message


def parse_request(message: dict, size: int = 0) -> Request:
    """Checks the envelope every action shares: ``action`` and ``request_id``.
    ``size``: the bytes of JSON it came as."""
    request_id, has_id = request_id_of(message)
    request = Request(action="", body=message, request_id=request_id, has_request_id=has_id, size=size)
    if "request_id" in message and not has_id:
        raise RequestError(BAD_REQUEST, "request_id must be a string or a number" + (
            f" of at most {MAX_REQUEST_ID_CHARS} characters" if _is_id_type(message["request_id"]) else ""))
    action = message.get("action")
    if action is None:
        raise RequestError(BAD_REQUEST, "Missing action")
    if not isinstance(action, str):
        raise RequestError(BAD_REQUEST, f"action must be a string, got {json_type(action)}")
    if action not in ACTIONS:
        raise unknown_action(action)
    request.action = action
    return request


def unknown_action(action: str) -> RequestError:
    """The answer to an action this daemon does not have (v1 text, the name cut short)."""
    return RequestError(UNKNOWN_ACTION, f"Unknown action: {clipped(action)}")


def ok_response(request: Request | None, payload: dict) -> dict:
    response = {"status": "ok", **payload}
    return _with_request_id(request, response)


def error_response(request: Request | None, error: RequestError) -> dict:
    # Cut here, whoever raised it: an error quoting a client's value at length
    # must not come back (or be encoded on the event loop) whole.
    response: dict[str, Any] = {"error": clipped(error.message, MAX_ERROR_CHARS), "code": error.code}
    if error.retry_after_ms is not None:
        response["retry_after_ms"] = int(error.retry_after_ms)
    if error.field is not None:
        response["field"] = error.field
    return _with_request_id(request, response)


def _with_request_id(request: Request | None, response: dict) -> dict:
    if request is not None and request.has_request_id:
        response["request_id"] = request.request_id
    return response


def request_id_of(message: Any) -> tuple[Any, bool]:
    """The ``request_id`` of a message that failed validation, if it is echoable."""
    if isinstance(message, dict) and "request_id" in message:
        rid = message["request_id"]
        if _is_id_type(rid) and _id_fits(rid):
            return rid, True
    return None, False


_ID_INT_LIMIT = 10 ** MAX_REQUEST_ID_CHARS


def _is_id_type(rid: Any) -> bool:
    return isinstance(rid, (str, int, float)) and not isinstance(rid, bool)


def _id_fits(rid: str | int | float) -> bool:
    """Short enough to echo and log, and representable in an answer."""
    if isinstance(rid, str):
        return len(rid) <= MAX_REQUEST_ID_CHARS
    if isinstance(rid, int):  # JSON allows thousands of digits
        return abs(rid) < _ID_INT_LIMIT
    return math.isfinite(rid)  # 1e999 parses as infinity, which an answer could not carry back


# ---------------------------------------------------------------- field checks

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = MAX_SHOWN_CHARS


def shown(value: Any) -> str:
    """A client's value in an error message, cut short: a 60 MB string must not
    come back (or go to the log) whole."""
    return _SHOWN.repr(value)


def clipped(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` (unquoted, unlike :func:`shown`) cut to ``limit`` characters,
    saying how many were cut. Slicing first: the cost does not grow with the text."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def require_str(container: dict, key: str, where: str = "") -> str:
    value = container.get(key)
    if not isinstance(value, str) or not value:
        raise RequestError(BAD_REQUEST, f"{where}{key} must be a non-empty string")
    return value


def optional_str(container: dict, key: str, default: str | None, where: str = "") -> str | None:
    if key not in container or container[key] is None:
        return default
    value = container[key]
    if not isinstance(value, str):
        raise RequestError(BAD_REQUEST, f"{where}{key} must be a string, got {json_type(value)}")
    return value


def optional_object(container: dict, key: str, where: str = "") -> dict:
    value = container.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(BAD_REQUEST, f"{where}{key} must be an object, got {json_type(value)}")
    return value


def optional_number(container: dict, key: str, default, *, minimum=None, maximum=None,
                    integer: bool = False, where: str = ""):
    if key not in container or container[key] is None:
        return default
    value = container[key]
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not (isinstance(value, int) or float(value).is_integer())):
        raise RequestError(BAD_REQUEST, f"{where}{key} must be {kind}, got {json_type(value)}")
    if value != value:  # NaN cannot come from JSON, but be safe
        raise RequestError(BAD_REQUEST, f"{where}{key} must be {kind}")
    if minimum is not None and value < minimum:
        raise RequestError(BAD_REQUEST, f"{where}{key} must be >= {minimum}, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise RequestError(BAD_REQUEST, f"{where}{key} must be <= {maximum}, got {shown(value)}")
    return int(value) if integer else value


SHUTDOWN_RETRY_AFTER_MS = 1000   # about what a restart takes


def shutting_down() -> RequestError:
    """The refusal of work while the daemon stops, with a hint: without one a
    loaded service resends at once, for as long as the stop takes."""
    return RequestError(SHUTTING_DOWN, "The device manager is shutting down", retry_after_ms=SHUTDOWN_RETRY_AFTER_MS)
