"""Protocol v1 over the real socket of a running daemon (simulated backend)."""
from __future__ import annotations

import base64
import json
import socket
import struct
import time

import numpy as np
import pytest

from hailo_devmgr.wire import protocol as p
from hailo_devmgr.client import Client, DeviceError, tensor
from wire import read_answer

V1_STATUS_FIELDS = {
    "status", "device_id", "loaded_models", "uptime_seconds", "socket_path", "queue_depth",
    "total_lru_evictions", "runtime_broken_reason", "last_capacity_event_reason",
    "last_capacity_event_model", "last_capacity_event_at",
}


def raw_exchange(path: str, payload: bytes, *, read: bool = True) -> dict | None:
    """Send raw bytes, read one framed answer (None if the daemon closed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(payload)
        return read_frame(sock) if read else None


def read_frame(sock: socket.socket) -> dict | None:
    """The next answer (through the codec); None when the daemon closed between frames."""
    return read_answer(sock)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def image(value: int = 1, shape=(224, 224, 3)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint8)


# ------------------------------------------------------------------ actions

def test_ping_and_status_have_every_v1_field(client, daemon, model_dir):
    for action in ("ping", "status"):
        response = client.request(action)
        assert V1_STATUS_FIELDS <= set(response)
        assert response["status"] == "ok"
        assert response["socket_path"] == daemon.socket_path
        assert response["loaded_models"] == [] and response["queue_depth"] == 0
        assert response["runtime_broken_reason"] is None


def test_device_status_shape(client):
    response = client.device_status()
    assert set(response["device"]) == {"device_id", "architecture", "fw_version", "temperature_celsius"}
    assert response["device"]["architecture"]
    assert set(response["networks"]) == {"status", "source", "network_count", "networks"}
    assert response["networks"]["network_count"] == 0
    assert "uptime_seconds" in response and "queue_depth" in response


def test_load_infer_unload_generic(client, model_dir):
    path = str(model_dir / "net.hef")
    first = client.load_model(path, model_type="generic")
    assert first == {"status": "ok", "model_path": path, "model_type": "generic",
                     "message": "Model loaded", "request_id": 1}
    assert client.load_model(path, model_type="generic")["message"] == "Model already loaded"

    response = client.infer(path, {"inputs": {"input_layer1": tensor(image(3))}}, model_type="generic")
    output = response["result"]["outputs"]["output_layer1"]
    assert output.dtype == np.float32 and output.shape == (512,)
    assert response["inference_time_ms"] >= 0

    again = client.infer(path, {"inputs": {"input_layer1": tensor(image(3))}}, model_type="generic")
    other = client.infer(path, {"inputs": {"input_layer1": tensor(image(4))}}, model_type="generic")
    assert np.array_equal(again["result"]["outputs"]["output_layer1"], output)  # deterministic
    assert not np.array_equal(other["result"]["outputs"]["output_layer1"], output)  # input-dependent

    status = client.status()
    [model] = status["loaded_models"]
    assert model["model_type"] == "generic" and model["model_path"] == path
    assert model["last_used"] >= model["loaded_at"] > 0

    assert client.unload_model(path, "generic")["message"] == "Model unloaded"
    assert client.unload_model(path, "generic")["message"] == "Model was not loaded"
    assert client.status()["loaded_models"] == []


def test_infer_loads_on_demand_with_named_multi_io(client, model_dir):
    path = str(model_dir / "two.hef")
    inputs = {"a": tensor(np.zeros((4, 4, 3), np.uint8)), "b": tensor(np.ones(8, np.float32))}
    outputs = client.infer(path, {"inputs": inputs}, model_type="generic")["result"]["outputs"]
    assert outputs["sum"].shape == (8,) and outputs["sum"].dtype == np.float32
    assert outputs["map"].shape == (4, 4) and outputs["map"].dtype == np.uint8
    assert [m["model_path"] for m in client.status()["loaded_models"]] == [path]


def test_clip_image_and_text(client, model_dir):
    image_hef, text_hef = str(model_dir / "net.hef"), str(model_dir / "clip_text.hef")
    params = {"image_hef_path": image_hef, "text_hef_path": text_hef}
    loaded = client.load_model(image_hef, "clip", params)
    assert loaded["message"] == "Model loaded"
    embedding = client.infer(image_hef, {"mode": "image", "tensor": tensor(image())}, "clip", params)["result"]
    assert embedding.dtype == np.float32 and embedding.shape == (512,)
    tokens = np.zeros((77, 512), np.float32)
    text = client.infer(image_hef, {"mode": "text", "tensor": tensor(tokens)}, "clip", params)["result"]
    assert text.dtype == np.float32 and text.shape == (512,)


def test_clip_text_mode_without_text_hef_is_a_clear_error(client, model_dir):
    path = str(model_dir / "net.hef")
    with pytest.raises(DeviceError) as info:
        client.infer(path, {"mode": "text", "tensor": tensor(np.zeros((77, 512), np.float32))}, "clip")
    assert info.value.code == p.BAD_REQUEST and "text_hef_path" in info.value.message


def test_vlm_chat_and_vlm(client, model_dir):
    path = str(model_dir / "vlm.hef")
    frame_ = tensor(image(9, (336, 336, 3)))
    chat = client.infer(path, {"prompt": "What is in the picture?", "frames": [frame_, frame_],
                               "temperature": 0.2, "seed": 7, "max_generated_tokens": 50}, "vlm_chat")
    assert isinstance(chat["result"], str) and chat["result"]
    again = client.infer(path, {"prompt": "What is in the picture?", "frames": [frame_, frame_],
                                "temperature": 0.2, "seed": 7, "max_generated_tokens": 50}, "vlm_chat")
    assert again["result"] == chat["result"]  # context cleared: same question, same answer
    # The wire's default model_type is vlm, as in v1 (the client library requires one).
    single = client.request("infer", model_path=path, input_data={"prompt": "Describe.", "image": frame_})
    assert isinstance(single["result"], str)


# ------------------------------------------------------------------ bad input

BAD_REQUESTS = [
    ({"action": "load_model"}, p.BAD_REQUEST, "model_path required"),
    ({"action": "load_model", "model_path": 5}, p.BAD_REQUEST, "model_path must be a string"),
    ({"action": "infer", "model_path": "{net}"}, p.BAD_REQUEST, "model_path and input_data required"),
    ({"action": "infer", "input_data": {}}, p.BAD_REQUEST, "model_path and input_data required"),
    ({"action": "load_model", "model_path": "{net}", "model_type": "teapot"},
     p.UNSUPPORTED_MODEL_TYPE, "Unsupported model_type: teapot"),
    ({"action": "load_model", "model_path": "{dir}/missing.hef", "model_type": "generic"},
     p.MODEL_NOT_FOUND, "Model file not found: {dir}/missing.hef"),
    ({"action": "load_model", "model_path": "{dir}/subdir", "model_type": "generic"},
     p.MODEL_NOT_FOUND, "Model file not found: {dir}/subdir"),
    ({"action": "load_model", "model_path": "/etc/passwd", "model_type": "generic"},
     p.FORBIDDEN, "outside the allowed model folders"),
    ({"action": "load_model", "model_path": "{dir}/../../etc/passwd", "model_type": "generic"},
     p.FORBIDDEN, "outside the allowed model folders"),
    ({"action": "load_model", "model_path": "{dir}/escape.hef", "model_type": "generic"},
     p.FORBIDDEN, "outside the allowed model folders"),
    ({"action": "infer", "model_path": "{net}", "model_type": "clip",
      "model_params": {"text_hef_path": "{dir}/escape.hef"}, "input_data": {"mode": "image"}},
     p.FORBIDDEN, "outside the allowed model folders"),
    ({"action": "load_model", "model_path": "{dir}/empty.hef", "model_type": "generic"},
     p.LOAD_FAILED, "Failed to load model: "),
    ({"action": "load_model", "model_path": "{net}", "model_type": "generic", "model_params": []},
     p.BAD_REQUEST, "model_params must be an object"),
    ({"action": "infer", "model_path": "{net}", "model_type": "generic", "input_data": []},
     p.BAD_REQUEST, "input_data must be an object"),
    ({"action": "infer", "model_path": "{net}", "model_type": "generic", "input_data": {"inputs": {
        "input_layer1": {"dtype": "uint8", "shape": [2]}}}},
     p.BAD_REQUEST, "tensor must include dtype, shape, and data_b64"),
    ({"action": "infer", "model_path": "{net}", "model_type": "generic", "input_data": {"inputs": {
        "input_layer1": {"dtype": "uint8", "shape": [224, 224, 3], "data_b64": "AAAA"}}}},
     p.BAD_REQUEST, "data has 3 bytes but dtype uint8 and shape [224, 224, 3] need 150528"),
    ({"action": "infer", "model_path": "{net}", "model_type": "generic", "input_data": {"inputs": {
        "input_layer1": {"dtype": "uint8", "shape": [-3], "data_b64": ""}}}},
     p.BAD_REQUEST, "shape sizes must be integers >= 0"),
    ({"action": "infer", "model_path": "{net}", "model_type": "generic", "input_data": {"inputs": {
        "input_layer1": {"dtype": "uint8", "shape": [99999, 99999, 99999], "data_b64": ""}}}},
     p.BAD_REQUEST, "over the limit"),
    ({"action": "infer", "model_path": "{net}", "model_type": "generic", "input_data": {"inputs": {
        "wrong_name": {"dtype": "uint8", "shape": [1], "data_b64": "AA=="}}}},
     p.BAD_REQUEST, "must name exactly the model inputs ['input_layer1']"),
    ({"action": "infer", "model_path": "{net}", "model_type": "generic", "input_data": {"inputs": {
        "input_layer1": {"dtype": "uint8", "shape": [1], "data_b64": "AA=="}}}},
     p.BAD_REQUEST, "has shape [1], the model expects [224, 224, 3]"),
    ({"action": "infer", "model_path": "{net}", "model_type": "clip", "input_data": {"mode": "audio"}},
     p.BAD_REQUEST, "input_data.mode must be"),
    ({"action": "infer", "model_path": "{vlm}", "model_type": "vlm_chat", "input_data": {"prompt": 3}},
     p.BAD_REQUEST, "input_data.prompt must be a string or a chat list of messages, got number"),
    ({"action": "infer", "model_path": "{vlm}", "model_type": "vlm_chat", "input_data": {
        "prompt": "hi", "frames": []}}, p.BAD_REQUEST, "input_data.frames must be a non-empty list"),
    ({"action": "infer", "model_path": "{vlm}", "model_type": "vlm_chat", "input_data": {
        "prompt": "hi", "frames": [{"dtype": "uint8", "shape": [1], "data_b64": "AA=="}],
        "temperature": "hot"}}, p.BAD_REQUEST, "input_data.temperature must be a number"),
    ({"action": "infer", "model_path": "{net}", "model_type": "generic",
      "model_params": {"simulate_ms": -1}, "input_data": {"inputs": {}}},
     p.BAD_REQUEST, "model_params.simulate_ms must be >= 0"),
    ({"action": "unload_model"}, p.BAD_REQUEST, "model_path required"),
    ({"action": "fly"}, p.UNKNOWN_ACTION, "Unknown action: fly"),
    ({"request_id": 1}, p.BAD_REQUEST, "Missing action"),
    ({"action": ["ping"]}, p.BAD_REQUEST, "action must be a string"),
]


@pytest.mark.parametrize("message, code, text", BAD_REQUESTS,
                         ids=[f"{i}-{m.get('action')}" for i, (m, _, _) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_clear_errors_and_connection_stays_usable(daemon, model_dir, message, code, text):
    names = {"net": str(model_dir / "net.hef"), "vlm": str(model_dir / "vlm.hef"), "dir": str(model_dir)}
    body = json.dumps(message).replace("{net}", names["net"]).replace("{vlm}", names["vlm"]) \
        .replace("{dir}", names["dir"])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(daemon.socket_path)
        sock.sendall(frame(body.encode()))
        response = read_frame(sock)
        assert response["code"] == code, response
        assert text.format(**names) in response["error"]
        if "tensor must include" in text:  # the v1 text exactly, the field beside it
            assert response["error"] == text and response["field"] == "input_data.inputs.input_layer1"
        assert "status" not in response or response["status"] != "ok"
        # Same connection, next request works.
        sock.sendall(p.encode_frame({"action": "ping", "request_id": "after"}))
        assert read_frame(sock)["request_id"] == "after"


@pytest.mark.parametrize("body, text", [
    (b"\xc3\x28", "not valid UTF-8"),
    (b"{\"action\": ", "Invalid JSON"),
    (b"[]", "must be a JSON object"),
    (b"42", "must be a JSON object"),
])
def test_undecodable_bodies_are_answered_and_connection_survives(daemon, body, text):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(daemon.socket_path)
        sock.sendall(frame(body))
        response = read_frame(sock)
        assert response["code"] == p.BAD_REQUEST and text in response["error"]
        sock.sendall(p.encode_frame({"action": "ping"}))
        assert read_frame(sock)["status"] == "ok"


def test_request_id_echoed_on_errors_and_omitted_without_one(client, daemon):
    response = raw_exchange(daemon.socket_path, p.encode_frame({"action": "nope", "request_id": "x-9"}))
    assert response["request_id"] == "x-9" and response["code"] == p.UNKNOWN_ACTION
    response = raw_exchange(daemon.socket_path, p.encode_frame({"action": "ping"}))
    assert "request_id" not in response


def test_oversized_length_is_refused_without_reading_body_and_closed(start_daemon):
    daemon = start_daemon(max_message_bytes=4096, max_pending_bytes=8192)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(daemon.socket_path)
        sock.sendall(struct.pack(">I", 2**32 - 1))  # 4 GiB announced, nothing sent
        response = read_frame(sock)
        assert response["code"] == p.TOO_LARGE and "exceeds the limit of 4096" in response["error"]
        assert sock.recv(1) == b""  # closed by the daemon
    # The daemon carries on for everyone else.
    with Client(daemon.socket_path, timeout=10) as other:
        assert other.ping()["status"] == "ok"


def test_truncated_frame_then_close_leaves_daemon_healthy(daemon):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(daemon.socket_path)
        sock.sendall(struct.pack(">I", 100) + b'{"action":')
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(daemon.socket_path)
        sock.sendall(b"\x00\x00")
    with Client(daemon.socket_path, timeout=10) as other:
        assert other.ping()["status"] == "ok"


def test_control_plane_answers_while_the_device_is_busy(client, daemon, model_dir):
    path = str(model_dir / "net.hef")
    client.load_model(path, "generic")
    slow = Client(daemon.socket_path, timeout=30).connect()
    slow._sock.sendall(p.encode_frame({
        "action": "infer", "model_type": "generic", "model_path": path, "request_id": "slow",
        "model_params": {"simulate_ms": 3000},
        "input_data": {"inputs": {"input_layer1": tensor(image())}}}))
    deadline = time.monotonic() + 10
    while "infer" not in (client.status()["device_busy_with"] or ""):  # wait until it runs
        assert time.monotonic() < deadline, "the slow inference never started"
        time.sleep(0.01)
    for _ in range(20):
        status = client.status()
        assert client.device_status()["status"] == "ok"
    # Every answer came while the 3 s inference still held the device.
    assert "infer" in status["device_busy_with"]
    assert read_frame(slow._sock)["request_id"] == "slow"
    slow.close()


def test_a_large_result_is_encoded_by_a_worker_and_answered_whole(daemon, model_dir):
    """A v1 answer over 64 KiB of tensors is base64-encoded in the worker
    pool (dispatch.SMALL_RESULT_BYTES), not on the event loop: the same answer."""
    path = model_dir / "large-output.hef"
    path.write_text("inputs: [{name: x, shape: [4], format: UINT8}]\n"
                    "outputs: [{name: y, shape: [320, 320], format: UINT8}]\n")
    request = {"action": "infer", "model_type": "generic", "model_path": str(path), "request_id": "big",
               "input_data": {"inputs": {"x": {"dtype": "uint8", "shape": [4], "data_b64": "AQIDBA=="}}}}
    answer = raw_exchange(daemon.socket_path, frame(json.dumps(request).encode()))
    assert answer["status"] == "ok" and answer["request_id"] == "big"
    output = answer["result"]["outputs"]["y"]
    assert output["dtype"] == "uint8" and output["shape"] == [320, 320]
    assert len(base64.b64decode(output["data_b64"])) == 320 * 320
