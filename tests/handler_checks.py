"""Per-model-type checks shared by the simulated and the real-hardware tests.

Every check talks to a running daemon through its socket and learns what
it needs about a model the way any client can: from the ``load_model``
answer (ocr's ``model_info``) and from the ``bad_request`` texts that name
the shape and dtype a model expects. So the same code runs against the
simulated backend's YAML "HEFs" (tests/test_handlers.py) and real HEFs on
a Hailo-10H (tests/test_hardware.py). The checks assert what holds on
both; the simulated tests add exact shapes and values on top.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from hailo_devmgr.wire import protocol as p
from hailo_devmgr.client import DeviceError, tensor

_EXPECTS_SHAPE = re.compile(r"the model expects \[([0-9, ]*)\]")
_EXPECTS_DTYPE = re.compile(r"has dtype \w+, the model expects (\w+)")
SAMPLE_RATE = 16_000


def refused(call, code: str = p.BAD_REQUEST) -> DeviceError:
    """Run ``call``; it must fail with ``code``. Returns the error."""
    with pytest.raises(DeviceError) as info:
        call()
    assert info.value.code == code, info.value.response
    return info.value


def probe_input(send) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a model input wants, from the daemon's own refusals.

    ``send(array)`` makes one request with ``array`` in the input's place.
    A one-element tensor draws ``... has shape [1], the model expects [...]``;
    zeros of that shape as uint8 either run or draw ``... has dtype uint8,
    the model expects X``.
    """
    error = refused(lambda: send(np.zeros((1,), np.uint8)))
    match = _EXPECTS_SHAPE.search(error.message)
    assert match, error.message
    shape = tuple(int(size) for size in match.group(1).split(",") if size.strip())
    try:
        send(np.zeros(shape, np.uint8))
    except DeviceError as exc:
        assert exc.code == p.BAD_REQUEST, exc.response
        match = _EXPECTS_DTYPE.search(exc.message)
        assert match, exc.message
        return shape, np.dtype(match.group(1))
    return shape, np.dtype(np.uint8)


def sample(shape, dtype, seed: int = 0) -> np.ndarray:
    """A deterministic, non-trivial input of the given shape and dtype."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.random(shape, dtype=np.float32).astype(dtype)
    return rng.integers(0, 255 if dtype.itemsize == 1 else 4096, size=shape).astype(dtype)


def tone(seconds: float, hertz: float = 440.0) -> np.ndarray:
    """A quiet sine tone: float32 PCM, 16 kHz mono."""
    t = np.arange(int(seconds * SAMPLE_RATE), dtype=np.float32) / SAMPLE_RATE
    return (0.1 * np.sin(2 * np.pi * hertz * t)).astype(np.float32)


def assert_tensor(value, dtype=np.float32):
    assert isinstance(value, np.ndarray), type(value)
    assert value.dtype == dtype and value.size > 0
    assert np.all(np.isfinite(value)) if value.dtype.kind == "f" else True
    return value


# ------------------------------------------------------------------ good requests

def check_generic(client, path: str) -> dict:
    shape, dtype = probe_input(lambda a: client.infer(path, {"inputs": {_only_input(client, path): tensor(a)}},
                                                      "generic"))
    outputs = client.infer(path, {"inputs": {_only_input(client, path): tensor(sample(shape, dtype))}},
                           "generic")["result"]["outputs"]
    assert outputs and all(isinstance(value, np.ndarray) for value in outputs.values())
    return outputs


def _only_input(client, path: str) -> str:
    """The input name of a one-input HEF, from the refusal of a wrong name."""
    error = refused(lambda: client.infer(path, {"inputs": {"?": tensor(np.zeros(1, np.uint8))}}, "generic"))
    names = re.search(r"model inputs \[(.*?)\]", error.message).group(1)
    return names.split(",")[0].strip().strip("'")


def check_clip(client, image_hef: str, text_hef: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    params = {"text_hef_path": text_hef} if text_hef else {}
    assert client.load_model(image_hef, "clip", params)["message"] in ("Model loaded", "Model already loaded")

    def run(mode, array):
        return client.infer(image_hef, {"mode": mode, "tensor": tensor(array)}, "clip", params)["result"]

    shape, dtype = probe_input(lambda a: run("image", a))
    image_embedding = assert_tensor(run("image", sample(shape, dtype)))
    text_embedding = None
    if text_hef:
        shape, dtype = probe_input(lambda a: run("text", a))
        text_embedding = assert_tensor(run("text", sample(shape, dtype)))
    return image_embedding, text_embedding


def check_depth(client, path: str) -> np.ndarray:
    def run(array):
        return client.infer(path, {"input": tensor(array)}, "depth")["result"]

    shape, dtype = probe_input(run)
    depth_map = assert_tensor(run(sample(shape, dtype)))
    assert np.array_equal(run(sample(shape, dtype)), depth_map)  # same input, same map
    return depth_map


def check_pose(client, path: str) -> dict[str, np.ndarray]:
    def run(array):
        return client.infer(path, {"input": tensor(array)}, "pose")["result"]

    shape, dtype = probe_input(run)
    outputs = run(sample(shape, dtype))
    assert isinstance(outputs, dict) and outputs
    for value in outputs.values():
        assert_tensor(value)
    return outputs


def check_ocr(client, path: str, params: dict, language: str) -> tuple[dict, np.ndarray, list]:
    loaded = client.load_model(path, "ocr", params)
    info = loaded["model_info"]
    detection_shape = tuple(info["detection_input_shape"])
    assert len(detection_shape) == 3 and all(size > 0 for size in detection_shape)
    assert language in info["recognition_input_shapes"]
    detection = assert_tensor(client.infer(path, {"mode": "detection", "image": tensor(
        sample(detection_shape, np.uint8))}, "ocr", params)["result"])

    def recognise(crops, **extra):
        return client.infer(path, {"mode": "recognition", "language": language,
                                   "crops": [tensor(crop) for crop in crops], **extra}, "ocr", params)["result"]

    crop_shape, crop_dtype = probe_input(lambda a: recognise([a]))
    assert crop_shape == tuple(info["recognition_input_shapes"][language])
    crops = [sample(crop_shape, crop_dtype, seed) for seed in range(5)]
    logits = recognise(crops)
    assert isinstance(logits, list) and len(logits) == len(crops)
    for item in logits:
        assert_tensor(item)
    # One crop per run or three: the same logits, crop for crop.
    for size in (1, 3):
        for batched, whole in zip(recognise(crops, batch_size=size), logits):
            assert np.array_equal(batched, whole)
    return info, detection, logits


def check_whisper(client, path: str) -> list[dict]:
    audio = tone(2.5)
    as_tensor = client.infer(path, {"audio": tensor(audio)}, "whisper")["result"]
    as_list = client.infer(path, {"audio": audio.tolist(), "language": "en", "task": "transcribe"},
                           "whisper")["result"]
    for result in (as_tensor, as_list):
        segments = result["segments"]
        assert isinstance(segments, list)
        for index, segment in enumerate(segments):
            assert set(segment) == {"id", "start", "end", "text"}
            assert segment["id"] == index and isinstance(segment["text"], str)
            assert 0 <= segment["start"] <= segment["end"]
    translated = client.infer(path, {"audio": tensor(tone(1.0)), "task": "translate"}, "whisper")["result"]
    assert isinstance(translated["segments"], list)
    return as_tensor["segments"]


def check_vlm(client, path: str) -> str:
    def run(array):
        return client.infer(path, {"prompt": "Describe the picture in one sentence.", "image": tensor(array),
                                   "max_generated_tokens": 32}, "vlm")["result"]

    shape, dtype = probe_input(run)
    # The load answer says the frame a client must make (what the probe found).
    info = client.load_model(path, "vlm")["model_info"]
    assert tuple(info["frame_shape"]) == tuple(shape) and info["frame_dtype"] == np.dtype(dtype).name
    text = run(sample(shape, dtype))
    assert isinstance(text, str) and text
    chat = client.infer(path, {"prompt": "What differs?", "frames": [tensor(sample(shape, dtype, 1)),
                                                                     tensor(sample(shape, dtype, 2))],
                               "seed": 1, "max_generated_tokens": 32}, "vlm_chat")["result"]
    assert isinstance(chat, str) and chat
    return text


# ------------------------------------------------------------------ bad fields
# (model_type, input_data, text in the error). Each is a bad_request; every
# one is refused before a model is loaded, so no model file is needed to
# check them beyond the path itself.

TENSOR = {"dtype": "uint8", "shape": [1], "data_b64": "AA=="}
BAD_INPUTS = [
    ("depth", [], "input_data must be an object"),
    ("depth", {}, "input_data.input is required"),
    ("depth", {"input": {"dtype": "uint8"}}, "tensor must include dtype, shape, and data_b64"),
    ("depth", {"input": TENSOR, "timeout_ms": 0}, "input_data.timeout_ms must be >= 1"),
    ("pose", {"input": "picture"}, "tensor must include dtype, shape, and data_b64"),
    ("pose", {"input": TENSOR, "timeout_ms": "soon"}, "input_data.timeout_ms must be an integer"),
    ("ocr", {"mode": "read"}, "input_data.mode must be \"detection\" or \"recognition\""),
    ("ocr", {"mode": "detection"}, "input_data.image is required"),
    ("ocr", {"mode": "recognition", "crops": []}, "input_data.crops must be a non-empty list of tensors"),
    ("ocr", {"mode": "recognition", "crops": [TENSOR] * 257}, "input_data.crops has 257 items"),
    ("ocr", {"mode": "recognition", "crops": [TENSOR, {"shape": [1]}]},
     "tensor must include dtype, shape, and data_b64"),
    ("ocr", {"mode": "recognition", "language": 7, "crops": [TENSOR]}, "input_data.language must be a string"),
    ("ocr", {"mode": "recognition", "crops": [TENSOR], "batch_size": 0}, "input_data.batch_size must be >= 1"),
    ("ocr", {"mode": "recognition", "crops": [TENSOR], "batch_size": 65}, "input_data.batch_size must be <= 64"),
    ("whisper", {}, "input_data.audio is required"),
    ("whisper", {"audio": "hello"}, "input_data.audio must be a list of float samples or a float32 tensor"),
    ("whisper", {"audio": [0.1, "x"]}, "input_data.audio must be a list of numbers"),
    ("whisper", {"audio": [0.1, True]}, "input_data.audio must be a list of numbers"),
    ("whisper", {"audio": []}, "input_data.audio is empty"),
    ("whisper", {"audio": [0.5, 2.0]}, "input_data.audio samples must lie in [-1, 1]"),
    ("whisper", {"audio": tensor(np.zeros(8, np.int16))}, "input_data.audio must be float32 samples"),
    ("whisper", {"audio": tensor(np.zeros((2, 8), np.float32))}, "input_data.audio must be mono"),
    ("whisper", {"audio": tensor(np.array([0.0, np.nan], np.float32))}, "NaN or infinite"),
    ("whisper", {"audio": [0.1], "language": "English"}, "input_data.language must be a language code"),
    ("whisper", {"audio": [0.1], "language": 5}, "input_data.language must be a language code"),
    ("whisper", {"audio": [0.1], "task": "summarize"}, "input_data.task must be \"transcribe\" or \"translate\""),
    ("whisper", {"audio": [0.1], "timeout_ms": 600001}, "input_data.timeout_ms must be <= 600000"),
]
