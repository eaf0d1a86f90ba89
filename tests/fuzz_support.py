"""Hypothesis strategies and settings shared by the fuzz tests.

Example counts are modest by default so ``make test`` stays quick;
``HYPOTHESIS_PROFILE=long`` (what ``make fuzz`` sets) multiplies them and
keeps a failure database under build/hypothesis so a find replays.
The settings are applied per test (``@FUZZ(n)``), not loaded globally.
"""
from __future__ import annotations

import base64
import json
import math
import os
import sys

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "fuzz") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "fuzz"))

import harness  # noqa: E402,F401  (fuzz/harness.py, re-exported to the fuzz tests)

from hailo_devmgr.wire import protocol as p  # noqa: E402
from hailo_devmgr.wire.tensors import ALLOWED_DTYPES  # noqa: E402

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
MULTIPLIER = {"default": 1, "long": 10}.get(PROFILE, 1)


def FUZZ(examples: int) -> settings:  # noqa: N802 - used as a decorator
    """Settings for one fuzz test: ``examples`` by default, more with the long profile."""
    return settings(
        max_examples=examples * MULTIPLIER,
        deadline=None,  # no timing in tests
        database=DirectoryBasedExampleDatabase(os.path.join(ROOT, "build", "hypothesis"))
        if PROFILE == "long" else None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ------------------------------------------------------------------ JSON

# Any code point, lone surrogates included (a JSON "\ud800" escape decodes to one).
any_character = st.characters(blacklist_categories=())
# What json.loads can produce, NaN and infinities included (it accepts them).
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(10 ** 60), max_value=10 ** 60),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.text(any_character, max_size=4),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def dumps(value) -> bytes:
    """JSON text the way a careless client might write it (NaN, Infinity, lone surrogates)."""
    return json.dumps(value, allow_nan=True).encode("utf-8")


def absent_or(strategy):
    """A key's value, or the key left out (``ABSENT``)."""
    return st.one_of(st.just(ABSENT), strategy)


ABSENT = object()


def objects(fields: dict) -> st.SearchStrategy:
    """A dict with each of ``fields``' keys present or not, plus the odd unknown key."""
    @st.composite
    def build(draw):
        out = {}
        for key, strategy in fields.items():
            value = draw(absent_or(strategy))
            if value is not ABSENT:
                out[key] = value
        if draw(st.integers(0, 9)) == 0:
            out[draw(st.text(max_size=6))] = draw(json_values)
        return out
    return build()


# ------------------------------------------------------------------ tensors

@st.composite
def wire_tensors(draw, max_dims: int = 3, max_size: int = 5):
    """v1 tensors, mostly well-formed, often a little off."""
    dtype = draw(st.one_of(st.sampled_from(sorted(ALLOWED_DTYPES)),
                           st.sampled_from(["object", "str", "complex64", "U4", "V8", ""]), json_values))
    shape = draw(st.one_of(
        st.lists(st.integers(0, max_size), max_size=max_dims),
        st.lists(st.sampled_from([0, 1, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 70]), max_size=4),
        st.lists(st.one_of(st.integers(), st.booleans(), st.floats(), st.text(max_size=2)), max_size=10),
        json_values))
    itemsize = 1
    if isinstance(dtype, str) and dtype in ALLOWED_DTYPES:
        import numpy as np
        itemsize = np.dtype(dtype).itemsize
    count = 1
    if isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        count = math.prod(shape)
    size = count * itemsize
    raw = draw(st.one_of(st.binary(min_size=size, max_size=size) if size <= 4096 else st.just(b""),
                         st.binary(max_size=64)))
    data = draw(st.one_of(st.just(base64.b64encode(raw).decode()), st.text(max_size=12), json_values))
    tensor = {"dtype": dtype, "shape": shape, "data_b64": data}
    for key in ("dtype", "shape", "data_b64"):
        if draw(st.integers(0, 19)) == 0:
            del tensor[key]
    return tensor


tensor_like = st.one_of(wire_tensors(), wire_tensors(), json_values)
timeouts = st.one_of(st.integers(-5, 700_000), st.floats(allow_nan=True), json_values)


# ------------------------------------------------------------------ per model type

def input_data(model_type: str) -> st.SearchStrategy:
    common = {"timeout_ms": timeouts}
    frames = st.lists(tensor_like, max_size=3)
    per_type = {
        "generic": {"inputs": st.one_of(st.dictionaries(st.sampled_from(["x", "input_layer1", "a", ""]),
                                                        tensor_like, max_size=3), json_values)},
        "clip": {"mode": st.one_of(st.sampled_from(["image", "text"]), json_values), "tensor": tensor_like},
        "vlm": {"prompt": st.one_of(st.text(max_size=30), json_values), "image": tensor_like},
        "vlm_chat": {"prompt": st.one_of(st.text(max_size=30), json_values), "frames": st.one_of(frames, json_values),
                     "temperature": st.one_of(st.floats(-1, 101), json_values),
                     "seed": st.one_of(st.integers(-1, 2 ** 32), json_values),
                     "max_generated_tokens": st.one_of(st.integers(-1, 9000), json_values)},
        "whisper": {"audio": st.one_of(st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=40),
                                       st.lists(st.one_of(st.floats(allow_nan=True), st.integers(),
                                                          st.integers(min_value=10 ** 300, max_value=10 ** 320)),
                                                max_size=6),
                                       tensor_like, json_values),
                    "language": st.one_of(st.sampled_from(["en", "de", "haw", None]), json_values),
                    "task": st.one_of(st.sampled_from(["transcribe", "translate"]), json_values)},
        "ocr": {"mode": st.one_of(st.sampled_from(["detection", "recognition"]), json_values),
                "image": tensor_like, "language": st.one_of(st.sampled_from(["en", ""]), json_values),
                "crops": st.one_of(frames, json_values), "batch_size": st.one_of(st.integers(-1, 70), json_values)},
        "depth": {"input": tensor_like},
        "pose": {"input": tensor_like},
    }
    return st.one_of(objects({**per_type.get(model_type, {}), **common}), json_values)


def model_params(model_type: str, paths: dict) -> st.SearchStrategy:
    path = st.one_of(st.sampled_from([paths[name] for name in
                                      ("net", "small", "empty", "escape", "missing", "subdir", "outside",
                                       "dotdot", "relative")]),
                     st.text(any_character, max_size=12).map(lambda text: "/" + text), json_values)
    # The simulation knobs: only values that are refused or take a few ms at most.
    sim_ms = st.one_of(st.integers(0, 3), st.integers(max_value=-1), st.integers(min_value=600_001),
                       st.floats(0.5, 2.5), st.text(max_size=3))
    fields = {"simulate_ms": sim_ms, "simulate_hang_ms": sim_ms}
    if model_type == "clip":
        fields.update(image_hef_path=path, text_hef_path=path,
                      text_input_layer=st.one_of(st.text(max_size=8), json_values),
                      text_output_layer=st.one_of(st.text(max_size=8), json_values))
    if model_type == "ocr":
        languages = st.one_of(st.sampled_from(["en", "zh", "latin", "9x", ""]), st.text(max_size=4))
        fields.update(detection_hef_path=path,
                      recognition_hefs=st.one_of(st.dictionaries(languages, path, max_size=3), json_values),
                      batch_sizes=st.one_of(st.dictionaries(languages, st.one_of(st.integers(-1, 70), json_values),
                                                            max_size=3), json_values))
    return st.one_of(objects(fields), st.none(), json_values.filter(lambda v: not isinstance(v, dict)))


MODEL_TYPES = ("generic", "clip", "vlm", "vlm_chat", "whisper", "ocr", "depth", "pose")
# Every action a client may send, but the root-only test hook `simulate`
# (it can hang the simulated chip on purpose).
FUZZ_ACTIONS = sorted(p.ACTIONS - p.DEBUG_ACTIONS)


@st.composite
def request_bodies(draw, paths: dict, actions=None):
    """A request as a JSON object: every action, every model type, fields right, wrong or missing."""
    action = draw(st.one_of(st.sampled_from(actions or FUZZ_ACTIONS),
                            st.text(max_size=10).filter(lambda a: a not in p.DEBUG_ACTIONS), json_values))
    model_type = draw(st.one_of(st.sampled_from(MODEL_TYPES), json_values))
    known_type = model_type if model_type in MODEL_TYPES else "generic"
    path = st.one_of(st.sampled_from([paths["net"], paths["small"], paths["escape"], paths["missing"],
                                      paths["subdir"], paths["empty"], paths["relative"]]), json_values)
    body = draw(objects({
        "request_id": st.one_of(st.text(max_size=8), st.integers(), st.floats(allow_nan=True), json_values),
        "model_type": st.just(model_type),
        "model_path": path,
        "model_params": model_params(known_type, paths),
        "input_data": input_data(known_type),
        "keep_alive": st.one_of(st.sampled_from([-1, 0, 5, "10m", "1h", "-1", "2x", "9" * 400, 10 ** 400]),
                                st.floats(allow_nan=True), json_values),
        "priority": st.one_of(st.sampled_from(["interactive", "normal", "batch"]), json_values),
        "timeout_ms": timeouts,
        "protocol": st.one_of(st.sampled_from([1, 2, 3]), json_values),
        "client": st.one_of(st.text(max_size=10), json_values),
    }))
    if draw(st.integers(0, 9)):  # most requests name their action
        body["action"] = action
    return body


# ------------------------------------------------------------------ requests that reach the device

def _tensor(dtype: str, shape: list) -> st.SearchStrategy:
    import numpy as np
    size = math.prod(shape) * np.dtype(dtype).itemsize
    return st.binary(min_size=size, max_size=size).map(
        lambda raw: {"dtype": dtype, "shape": shape, "data_b64": base64.b64encode(raw).decode()})


@st.composite
def valid_requests(draw, paths: dict):
    """Well-formed device requests for every model type, aimed at the small
    simulated models of harness.make_model_dir, so they load and run."""
    x = _tensor("uint8", [4])
    frame = _tensor("uint8", [4, 4, 3])
    model_type = draw(st.sampled_from(MODEL_TYPES))
    path = {"vlm": paths["vlm"], "vlm_chat": paths["vlm"], "whisper": paths["speech"]}.get(model_type, paths["small"])
    params = {"recognition_hefs": {"en": paths["small"]}} if model_type == "ocr" else {}
    inputs = {
        "generic": st.fixed_dictionaries({"inputs": st.fixed_dictionaries({"x": x})}),
        "clip": st.fixed_dictionaries({"mode": st.just("image"), "tensor": x}),
        "vlm": st.fixed_dictionaries({"prompt": st.text(max_size=20), "image": frame}),
        "vlm_chat": st.fixed_dictionaries({"prompt": st.text(max_size=20), "frames": st.lists(frame, min_size=1,
                                                                                               max_size=2)},
                                          optional={"seed": st.integers(0, 100),
                                                    "max_generated_tokens": st.integers(1, 8)}),
        "whisper": st.fixed_dictionaries({"audio": st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=64)},
                                         optional={"language": st.sampled_from(["en", "de", None]),
                                                   "task": st.sampled_from(["transcribe", "translate"])}),
        "ocr": st.one_of(st.fixed_dictionaries({"mode": st.just("detection"), "image": x}),
                         st.fixed_dictionaries({"mode": st.just("recognition"), "crops": st.lists(x, min_size=1,
                                                                                                    max_size=3)})),
        "depth": st.fixed_dictionaries({"input": x}),
        "pose": st.fixed_dictionaries({"input": x}),
    }[model_type]
    action = draw(st.sampled_from(["infer", "infer", "load_model", "unload_model"]))
    body = {"action": action, "model_type": model_type, "model_path": path,
            "request_id": draw(st.one_of(st.integers(), st.text(max_size=6)))}
    if action != "unload_model" and params:
        body["model_params"] = params
    if action == "infer":
        body["input_data"] = draw(inputs)
    if draw(st.booleans()):
        body["keep_alive"] = draw(st.sampled_from([-1, 0, 30, "1m"]))
    return body
