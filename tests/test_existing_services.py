"""The requests the existing services really send, and the fields they read.

Each test mirrors one service of gregm123456/raspberry_pi_hailo_ai_services
(commit 0ec609a), written here from reading its code (none copied): the
request shapes as its `device_client.py` frames them (v1, a uuid4
`request_id` that must come back, failure seen only as an `error` key), then
what the service does with the answer. Service files are cited as
`system_services/<service>/<file>:<line>`.
"""
from __future__ import annotations

import base64
import json
import socket
import uuid

import numpy as np
import pytest
import yaml

from test_daemon_v1 import frame, read_frame

# Simulated HEFs named and shaped as the services' models.
CLIP_TEXT = {"inputs": [{"name": "clip_vit_b_32_text_encoder/input_layer1", "shape": [1, 77, 512],
                         "format": "UINT8"}],
             "outputs": [{"name": "clip_vit_b_32_text_encoder/normalization25", "shape": [1, 77, 512],
                          "format": "UINT8"}]}
DEPTH = {"inputs": [{"name": "scdepthv3/input_layer1", "shape": [256, 320, 3], "format": "UINT8"}],
         "outputs": [{"name": "scdepthv3/conv31", "shape": [256, 320, 1], "format": "UINT8"}]}
POSE = {"inputs": [{"name": "yolov8s_pose/input_layer1", "shape": [640, 640, 3], "format": "UINT8"}],
        "outputs": [{"name": f"yolov8s_pose/conv{index}", "shape": [size, size, channels], "format": "UINT8"}
                    for index, (size, channels) in enumerate(
                        (s, c) for s in (20, 40, 80) for c in (64, 1, 51))]}
OCR_DET = {"inputs": [{"name": "ocr_det/input_layer1", "shape": [544, 960, 3], "format": "UINT8"}],
           "outputs": [{"name": "ocr_det/conv", "shape": [544, 960, 1], "format": "UINT8"}]}
OCR_REC = {"inputs": [{"name": "ocr/input_layer1", "shape": [48, 320, 3], "format": "UINT8"}],
           "outputs": [{"name": "ocr/logits", "shape": [40, 97], "format": "UINT8"}]}


def tensor(array: np.ndarray) -> dict:
    """As the services encode tensors (e.g. hailo_depth_server.py:64-70)."""
    array = np.ascontiguousarray(array)
    return {"dtype": str(array.dtype), "shape": list(array.shape),
            "data_b64": base64.b64encode(array.tobytes()).decode()}


def decode(value: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(value["data_b64"]), dtype=value["dtype"]).reshape(value["shape"])


class DeviceClient:
    """What device_manager/device_client.py does on the wire (:144-166)."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)

    def request(self, message: dict) -> dict:
        request_id = str(uuid.uuid4())
        self.sock.sendall(frame(json.dumps({**message, "request_id": request_id}).encode()))
        answer = read_frame(self.sock)
        assert answer.get("request_id") == request_id, answer  # checked before any error
        assert "error" not in answer, answer
        return answer

    def close(self):
        self.sock.close()


@pytest.fixture
def folders(tmp_path):
    """Model folders laid out as the services install them."""
    root = tmp_path / "var-lib"
    layout = {
        "hailo-vision/resources/models/hailo10h/Qwen2-VL-2B-Instruct.hef": "VLM",
        "hailo-whisper/resources/models/hailo10h/Whisper-Base.hef": "Speech2Text",
        "hailo-ocr/resources/models/hailo10h/ocr_det.hef": OCR_DET,
        "hailo-ocr/resources/models/hailo10h/ocr.hef": OCR_REC,
        "hailo-depth/resources/models/scdepthv3.hef": DEPTH,
        "hailo-pose/resources/models/hailo10h/yolov8s_pose.hef": POSE,
        "hailo-resources/models/hailo10h/clip_vit_b_32_image_encoder.hef": "image encoder",
        "hailo-resources/models/hailo10h/clip_vit_b_32_text_encoder.hef": CLIP_TEXT,
    }
    for relative, content in layout.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return root


@pytest.fixture
def dm(start_daemon, folders):
    daemon = start_daemon(model_dirs=[str(folders)], simulated={"device_memory_mb": 16384})
    client = DeviceClient(daemon.socket_path)
    yield client
    client.close()


def test_hailo_vision(dm, folders):
    """hailo_vision_server.py:226 (load), :276-304 (chat-list prompt, one frame, seed null), :306-311."""
    path = str(folders / "hailo-vision/resources/models/hailo10h/Qwen2-VL-2B-Instruct.hef")
    dm.request({"action": "load_model", "model_path": path, "model_type": "vlm_chat"})
    answer = dm.request({"action": "infer", "model_path": path, "model_type": "vlm_chat", "input_data": {
        "prompt": [
            {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}],
        "frames": [tensor(np.zeros((336, 336, 3), np.uint8))],
        "temperature": 0.7, "seed": None, "max_generated_tokens": 200}})
    assert isinstance(answer["result"], str) and answer["result"].split("<|im_end|>")[0].strip()
    assert isinstance(answer["inference_time_ms"], (int, float))


def test_hailo_clip(dm, folders):
    """hailo_clip_service.py:236-242 (four model_params, load before every infer), :305-314 (image,
    no model_params), :336-353 (text float32 [1, 77, 512]; the output is indexed [b, token, :])."""
    models = folders / "hailo-resources/models/hailo10h"
    image_hef = str(models / "clip_vit_b_32_image_encoder.hef")
    params = {"image_hef_path": image_hef, "text_hef_path": str(models / "clip_vit_b_32_text_encoder.hef"),
              "text_input_layer": "clip_vit_b_32_text_encoder/input_layer1",
              "text_output_layer": "clip_vit_b_32_text_encoder/normalization25"}
    for mode, array in (("image", np.zeros((224, 224, 3), np.uint8)),
                        ("text", np.random.default_rng(0).standard_normal((1, 77, 512)).astype(np.float32))):
        dm.request({"action": "load_model", "model_path": image_hef, "model_type": "clip", "model_params": params})
        answer = dm.request({"action": "infer", "model_path": image_hef, "model_type": "clip",
                             "input_data": {"mode": mode, "tensor": tensor(array), "timeout_ms": 5000}})
        output = decode(answer["result"])
        assert output.dtype == np.float32
        if mode == "image":
            assert output.flatten().size == 512
        else:
            assert output.shape == (1, 77, 512) and output[0, 5, :].shape == (512,)


@pytest.mark.parametrize("language", ["en", "auto"])
def test_hailo_whisper(dm, folders, language):
    """hailo_whisper_server.py:123 (load), :163-173 (audio as a JSON list, "auto" when no language is
    configured, :306-307), :314-337 (segments' start, end, text joined without separators), :134-151."""
    path = str(folders / "hailo-whisper/resources/models/hailo10h/Whisper-Base.hef")
    dm.request({"action": "load_model", "model_path": path, "model_type": "whisper"})
    audio = (0.1 * np.sin(np.arange(16000 * 3) / 10)).astype(np.float32)
    answer = dm.request({"action": "infer", "model_path": path, "model_type": "whisper", "input_data": {
        "audio": audio.tolist(), "language": language, "task": "transcribe"}})
    segments = answer["result"]["segments"]
    assert segments and all({"start", "end", "text"} <= set(segment) for segment in segments)
    assert "".join(segment["text"] for segment in segments).strip()
    assert dm.request({"action": "unload_model", "model_path": path,
                       "model_type": "whisper"})["message"] == "Model unloaded"


def test_hailo_ocr(dm, folders):
    """hailo_ocr_server.py:146-162 (model_params with load and every infer; model_info), :212-226
    (detection: one HWC tensor back, read as [:, :, 0]), :252-271 (recognition: a list, one per crop)."""
    models = folders / "hailo-ocr/resources/models/hailo10h"
    detection = str(models / "ocr_det.hef")
    params = {"detection_hef_path": detection, "recognition_hefs": {"en": str(models / "ocr.hef")},
              "batch_sizes": {"en": 8}}
    loaded = dm.request({"action": "load_model", "model_path": detection, "model_type": "ocr",
                         "model_params": params})
    height, width, _ = loaded["model_info"]["detection_input_shape"]
    answer = dm.request({"action": "infer", "model_path": detection, "model_type": "ocr", "model_params": params,
                         "input_data": {"mode": "detection",
                                        "image": tensor(np.full((height, width, 3), 128, np.uint8))}})
    assert decode(answer["result"])[:, :, 0].shape == (height, width)
    crops = [tensor(np.full((48, 320, 3), value, np.uint8)) for value in range(11)]
    answer = dm.request({"action": "infer", "model_path": detection, "model_type": "ocr", "model_params": params,
                         "input_data": {"mode": "recognition", "language": "en", "crops": crops, "batch_size": 8}})
    assert [decode(item).shape for item in answer["result"]] == [(40, 97)] * 11


def test_hailo_depth(dm, folders):
    """hailo_depth_server.py:202 (load), :271-284 (one bare tensor, squeezed to 2-D), :190-194 and
    :322-384 (HWC from the HEF's shape, NCHW [1, 3, 256, 320] when it cannot be read)."""
    path = str(folders / "hailo-depth/resources/models/scdepthv3.hef")
    dm.request({"action": "load_model", "model_path": path, "model_type": "depth"})
    image = np.random.default_rng(1).integers(0, 256, (256, 320, 3), dtype=np.uint8)
    maps = [decode(dm.request({"action": "infer", "model_path": path, "model_type": "depth",
                               "input_data": {"input": tensor(layout)}})["result"])
            for layout in (image, image.transpose(2, 0, 1)[np.newaxis])]
    assert np.squeeze(maps[0]).shape == (256, 320)
    assert np.array_equal(maps[0], maps[1])


def test_hailo_pose(dm, folders):
    """hailo_pose_service.py:198 (load), :264-293 (a dict of outputs, each HWC without a batch dim,
    looked up by shape), :382 (unload on shutdown)."""
    path = str(folders / "hailo-pose/resources/models/hailo10h/yolov8s_pose.hef")
    dm.request({"action": "load_model", "model_path": path, "model_type": "pose"})
    answer = dm.request({"action": "infer", "model_path": path, "model_type": "pose",
                         "input_data": {"input": tensor(np.full((640, 640, 3), 114, np.uint8))}})
    result = answer["result"]
    assert isinstance(result, dict) and "dtype" not in result
    shapes = sorted(tuple(decode(value).shape) for value in result.values())
    assert shapes == sorted((s, s, c) for s in (20, 40, 80) for c in (64, 1, 51))
    dm.request({"action": "unload_model", "model_path": path, "model_type": "pose"})


def test_status_fields_the_web_portal_and_tools_read(dm, folders):
    """hailo-web-portal status_formatters.py:141-173 (device fields, uptime, networks' name, model_type,
    loaded_at, last_used as numbers), app.py:173-175 (temperature a number, never null)."""
    path = str(folders / "hailo-depth/resources/models/scdepthv3.hef")
    dm.request({"action": "load_model", "model_path": path, "model_type": "depth"})
    status = dm.request({"action": "status"})
    for key in ("device_id", "loaded_models", "uptime_seconds", "socket_path", "queue_depth", "total_lru_evictions",
                "runtime_broken_reason", "last_capacity_event_reason", "last_capacity_event_model",
                "last_capacity_event_at"):
        assert key in status, key
    device = dm.request({"action": "device_status"})
    assert {"device_id", "architecture", "fw_version"} <= set(device["device"])
    assert isinstance(device["device"]["temperature_celsius"], float)
    assert isinstance(device["uptime_seconds"], float)
    assert device["networks"]["source"] == "device_manager" and device["networks"]["network_count"] == 1
    [network] = device["networks"]["networks"]
    assert network["name"] == "scdepthv3.hef" and network["model_type"] == "depth"
    assert isinstance(network["loaded_at"], float) and isinstance(network["last_used"], float)
