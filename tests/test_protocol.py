"""The wire codec on its own: a table of v1 cases, fed whole and byte by byte."""
import json
import struct

import pytest

from hailo_devmgr.wire import codec
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.wire.protocol import RequestError

MESSAGES = [
    {"action": "ping"},
    {"action": "status", "request_id": 7},
    {"action": "infer", "request_id": "abc", "model_path": "/m/x.hef", "input_data": {"prompt": "é ☃"}},
    {},
]


@pytest.mark.parametrize("message", MESSAGES)
def test_frame_is_big_endian_length_then_utf8_json(message):
    frame = p.encode_frame(message)
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert json.loads(frame[4:].decode("utf-8")) == message


def test_decoder_whole_byte_by_byte_and_with_junk_after():
    frames = b"".join(p.encode_frame(m) for m in MESSAGES)
    reader = codec.FrameReader(decode=False)
    reader.feed(frames)
    assert [p.decode_body(f.body) for f in reader.frames()] == MESSAGES

    reader = codec.FrameReader(decode=False)
    bodies = []
    for index in range(len(frames)):
        reader.feed(frames[index:index + 1])
        bodies += [f.body for f in reader.frames()]
    assert [p.decode_body(b) for b in bodies] == MESSAGES

    reader = codec.FrameReader(decode=False)
    reader.feed(frames + b"\x00\x00")
    assert len(reader.frames()) == len(MESSAGES)
    assert reader.pending == 2


def test_length_over_limit_is_fatal_too_large_before_reading_body():
    reader = codec.FrameReader(max_message_bytes=10)
    reader.feed(struct.pack(">I", 11))
    with pytest.raises(RequestError) as info:
        reader.frames()
    assert info.value.code == p.TOO_LARGE and info.value.fatal


@pytest.mark.parametrize("body, text", [
    (b"\xff\xfe", "not valid UTF-8"),
    (b"{not json", "Invalid JSON"),
    (b"[1, 2]", "must be a JSON object, got array"),
    (b'"ping"', "must be a JSON object, got string"),
    (b"[" * 100000 + b"]" * 100000, "Invalid JSON"),
])
def test_bodies_that_are_not_objects_are_bad_requests(body, text):
    with pytest.raises(RequestError) as info:
        p.decode_body(body)
    assert info.value.code == p.BAD_REQUEST and text in info.value.message


@pytest.mark.parametrize("message, code, text", [
    ({}, p.BAD_REQUEST, "Missing action"),
    ({"action": 5}, p.BAD_REQUEST, "action must be a string"),
    ({"action": "dance"}, p.UNKNOWN_ACTION, "Unknown action: dance"),
    ({"action": "ping", "request_id": {"a": 1}}, p.BAD_REQUEST, "request_id"),
    ({"action": "ping", "request_id": True}, p.BAD_REQUEST, "request_id"),
])
def test_envelope_errors(message, code, text):
    with pytest.raises(RequestError) as info:
        p.parse_request(message)
    assert info.value.code == code and text in info.value.message


@pytest.mark.parametrize("request_id", ["r-1", 42, 1.5, ""])
def test_request_id_echoed_unchanged_on_success_and_error(request_id):
    request = p.parse_request({"action": "ping", "request_id": request_id})
    assert p.ok_response(request, {})["request_id"] == request_id
    error = p.error_response(request, RequestError(p.BUSY, "full", retry_after_ms=20))
    assert error == {"error": "full", "code": "busy", "retry_after_ms": 20, "request_id": request_id}


def test_no_request_id_means_none_echoed():
    request = p.parse_request({"action": "ping"})
    assert "request_id" not in p.ok_response(request, {})
    assert p.ok_response(request, {"x": 1}) == {"status": "ok", "x": 1}


def test_client_text_in_errors_is_cut_short():
    huge = "A" * (60 * 1024 * 1024)
    with pytest.raises(RequestError) as info:
        p.parse_request({"action": huge})
    assert info.value.code == p.UNKNOWN_ACTION
    assert info.value.message.startswith("Unknown action: AAAA") and len(info.value.message) < 200
    # Whoever raised it, the answer carries a bounded text.
    answer = p.error_response(None, RequestError(p.LOAD_FAILED, f"cannot open {huge}"))
    assert len(answer["error"]) < p.MAX_ERROR_CHARS + 100 and answer["error"].endswith("more characters)")


@pytest.mark.parametrize("request_id", ["r" * (p.MAX_REQUEST_ID_CHARS + 1), 10 ** p.MAX_REQUEST_ID_CHARS])
def test_an_over_long_request_id_is_refused_and_never_echoed(request_id):
    message = {"action": "ping", "request_id": request_id}
    with pytest.raises(RequestError) as info:
        p.parse_request(message)
    assert info.value.code == p.BAD_REQUEST
    assert info.value.message == f"request_id must be a string or a number of at most " \
                                 f"{p.MAX_REQUEST_ID_CHARS} characters"
    assert p.request_id_of(message) == (None, False)


def test_a_request_id_at_the_limit_is_echoed():
    request_id = "r" * p.MAX_REQUEST_ID_CHARS
    request = p.parse_request({"action": "ping", "request_id": request_id})
    assert p.ok_response(request, {})["request_id"] == request_id



@pytest.mark.parametrize("value", [float("nan"), float("inf"), object()])
def test_what_json_cannot_carry_fails_as_the_stdlib_fails(value):
    """(protocol.py's one-shot encoder: the stdlib's errors, word for word;
    more in test_fuzz_properties.py)"""
    with pytest.raises((ValueError, TypeError)) as ours:
        p.encode_json({"x": [value]})
    with pytest.raises((ValueError, TypeError)) as stdlib:
        json.dumps({"x": [value]}, allow_nan=False)
    assert (type(ours.value), str(ours.value)) == (type(stdlib.value), str(stdlib.value))
