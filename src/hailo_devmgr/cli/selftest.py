"""`hailo-devmgr selftest`: one model of each installed type, loaded and run once.

For the first boot on new hardware: through the daemon's socket, as any
service would, it loads one HEF of each model type it finds (the
configuration's pinned models first, then files in the model folders,
recognised by name), runs one inference on a made-up input of the shape
the model wants, and unloads what it loaded. A row per model: type, model,
load ms, infer ms, result. Any failure makes the exit status non-zero.

Input shapes are learnt the way any client can: from the daemon's
``bad_request`` texts that name the shape a model expects, and from ocr's
``model_info``; so the same sequence runs on the simulated backend.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..client import Client, DeviceError, tensor

# File names -> model type, first match wins (Hailo's model zoo names: e.g.
# qwen2_vl_2b_instruct.hef, whisper_base.hef, clip_vit_b_32_image_encoder.hef,
# scdepthv3.hef, yolov8s_pose.hef, ocr_det.hef / paddle_ocr_det.hef).
TYPE_PATTERNS = (
    ("vlm", re.compile(r"(^|[_-])(vl|vlm|llava)([._-]|\d|$)|qwen2[_-]?vl", re.I)),
    ("whisper", re.compile(r"whisper", re.I)),
    ("clip", re.compile(r"clip(?!.*text)", re.I)),
    ("ocr", re.compile(r"ocr.*det|det.*ocr|paddle.*det", re.I)),
    ("depth", re.compile(r"depth", re.I)),
    ("pose", re.compile(r"pose", re.I)),
)
TYPES = ("generic", "clip", "depth", "pose", "ocr", "whisper", "vlm")
_EXPECTS_SHAPE = re.compile(r"the model expects \[([0-9, ]*)\]")
_EXPECTS_DTYPE = re.compile(r"the model expects (uint8|uint16|float32)")
_INPUT_NAMES = re.compile(r"must name exactly the model inputs \[([^\]]*)\]")
SAMPLE_RATE = 16_000


@dataclass
class Row:
    model_type: str
    model_path: str
    load_ms: float | None = None
    infer_ms: float | None = None
    result: str = ""
    ok: bool = False


def guess_type(file_name: str) -> str:
    for model_type, pattern in TYPE_PATTERNS:
        if pattern.search(file_name):
            return model_type
    return "generic"


def find_models(model_dirs, pins=()) -> dict[str, str]:
    """``{model_type: path}``: pinned models first, then the first HEF of each type in the folders."""
    chosen: dict[str, str] = {}
    for pin in pins:
        chosen.setdefault(pin.model_type, pin.model_path)
    for folder in model_dirs:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            if name.endswith(".hef") and os.path.isfile(os.path.join(folder, name)):
                chosen.setdefault(guess_type(name), os.path.join(folder, name))
    return {model_type: chosen[model_type] for model_type in TYPES if model_type in chosen}


def _probe(send: Callable[[np.ndarray], object]) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an input wants, from the daemon's refusals of wrong ones."""
    try:
        send(np.zeros((1,), np.uint8))
    except DeviceError as exc:
        match = _EXPECTS_SHAPE.search(exc.message)
        if not match:
            raise
        shape = tuple(int(size) for size in match.group(1).split(",") if size.strip())
    else:
        return (1,), np.dtype(np.uint8)
    try:
        send(np.zeros(shape, np.uint8))
    except DeviceError as exc:
        match = _EXPECTS_DTYPE.search(exc.message)
        if not match:
            raise
        return shape, np.dtype(match.group(1))
    return shape, np.dtype(np.uint8)


def _probe_all(names: list[str], send) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of several inputs: each refusal names one input and what it wants."""
    specs = {name: ((1,), np.dtype(np.uint8)) for name in names}
    for _ in range(2 * len(names) + 1):
        try:
            send({name: np.zeros(*spec) for name, spec in specs.items()})
            return specs
        except DeviceError as exc:
            named = re.search(r"'([^']+)' has (shape|dtype)", exc.message)
            shape, dtype = _EXPECTS_SHAPE.search(exc.message), _EXPECTS_DTYPE.search(exc.message)
            if not named or named.group(1) not in specs or not (shape or dtype):
                raise
            old_shape, old_dtype = specs[named.group(1)]
            specs[named.group(1)] = (
                tuple(int(size) for size in shape.group(1).split(",") if size.strip()) if shape else old_shape,
                np.dtype(dtype.group(1)) if dtype else old_dtype)
    return specs


def _sample(shape, dtype) -> np.ndarray:
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape, dtype=np.float32).astype(dtype)
    return rng.integers(0, 256, size=shape).astype(dtype)


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype.name} {list(value.shape)}"
    if isinstance(value, dict):
        if "segments" in value:
            return f"{len(value['segments'])} segment(s)"
        return ", ".join(f"{key}: {_describe(item)}" for key, item in value.items())
    if isinstance(value, str):
        return repr(value[:40] + ("..." if len(value) > 40 else ""))
    return str(value)[:60]


def _input_for(client: Client, model_type: str, path: str, loaded: dict) -> Callable[[], object]:
    """A function that runs the one inference of the self-test."""
    def infer(input_data):
        return client.infer(path, input_data, model_type)["result"]

    if model_type == "whisper":
        audio = (0.1 * np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
        return lambda: infer({"audio": tensor(audio)})
    if model_type == "ocr":
        shape = loaded["model_info"]["detection_input_shape"]
        return lambda: infer({"mode": "detection", "image": tensor(_sample(shape, np.uint8))})
    if model_type == "generic":
        try:
            infer({"inputs": {}})
        except DeviceError as exc:
            match = _INPUT_NAMES.search(exc.message)
            if not match:
                raise
            names = [name.strip().strip("'\"") for name in match.group(1).split(",") if name.strip()]
        specs = _probe_all(names, lambda arrays: infer({"inputs": {n: tensor(a) for n, a in arrays.items()}}))
        return lambda: infer({"inputs": {name: tensor(_sample(*spec)) for name, spec in specs.items()}})
    field, extra = {"clip": ("tensor", {"mode": "image"}), "vlm": ("image", {"prompt": "Describe the picture.",
                                                                             "max_generated_tokens": 16})
                    }.get(model_type, ("input", {}))
    spec = _probe(lambda a: infer({**extra, field: tensor(a)}))
    return lambda: infer({**extra, field: tensor(_sample(*spec))})


def run_one(client: Client, model_type: str, path: str, already_loaded: set) -> Row:
    row = Row(model_type, path)
    try:
        started = time.perf_counter()
        loaded = client.load_model(path, model_type)
        row.load_ms = (time.perf_counter() - started) * 1000
        run = _input_for(client, model_type, path, loaded)
        started = time.perf_counter()
        result = run()
        row.infer_ms = (time.perf_counter() - started) * 1000
        row.result, row.ok = _describe(result), True
    except DeviceError as exc:
        row.result = f"FAILED: {exc}"
    finally:
        if (model_type, path) not in already_loaded:
            try:
                client.unload_model(path, model_type)
            except DeviceError:
                pass  # not loaded, or pinned: nothing to give back
    return row


def run(client: Client, models: dict[str, str]) -> list[Row]:
    already = {(model["model_type"], model["model_path"]) for model in client.status().get("loaded_models", [])}
    return [run_one(client, model_type, path, already) for model_type, path in models.items()]


def table(rows: list[Row]) -> str:
    def ms(value):
        return "-" if value is None else f"{value:.0f}"
    lines = [f"{'type':<8} {'load ms':>8} {'infer ms':>9}  {'model':<40} result"]
    lines += [f"{row.model_type:<8} {ms(row.load_ms):>8} {ms(row.infer_ms):>9}  {row.model_path:<40} {row.result}"
              for row in rows]
    return "\n".join(lines)
