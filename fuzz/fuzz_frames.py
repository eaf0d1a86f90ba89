#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris, libFuzzer) of the frame codec and request parsing.

Each input is one frame's body or a byte stream as one connection would
send it (the first byte says which: harness.fuzz_one); it goes through
the frame codec (wire/codec.py FrameReader: v1 frames and v2 frames with
attachments, fed whole and read into the buffers it asks for),
decode_body, parse_request and, for device actions,
actions.prepare (model-file rules, handlers, tensors) against a model
folder of its own (fuzz/harness.py). Any exception but a RequestError is
a crash; bugs listed in harness.KNOWN_ISSUES are counted, not crashes,
unless --strict is given.

    make fuzz                      # installs atheris in build/fuzz-venv, runs FUZZ_SECONDS
    build/fuzz-venv/bin/python fuzz/fuzz_frames.py -max_total_time=60 build/fuzz/corpus

libFuzzer options pass through (-runs=, -max_total_time=, -artifact_prefix=,
a corpus folder). A seed corpus of valid requests for every action and
model type is written to the first corpus folder when it is empty.
Crashers land in -artifact_prefix (make: build/fuzz/crashes/); copy one
to tests/fuzz_regressions/ to keep it as a regression test.
"""
from __future__ import annotations

import base64
import collections
import json
import os
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

with atheris.instrument_imports(include=["harness", "hailo_devmgr"]):
    import harness
    from hailo_devmgr.wire import protocol  # noqa: F401  (instrumented through harness's imports)
    from hailo_devmgr.wire import codec

STRICT = "--strict" in sys.argv
if STRICT:
    sys.argv.remove("--strict")
# A fixed folder, so paths in the saved corpus still lead somewhere next run.
WORK = os.environ.get("FUZZ_WORK") or os.path.join(harness.ROOT, "build", "fuzz", "work")
PATHS = harness.make_model_dir(WORK)
CONFIG = harness.fuzz_config(PATHS["models"], max_message_bytes=1 << 20)
KNOWN = collections.Counter()


def body(message) -> bytes:
    """A seed holding one body (first byte odd, see harness.fuzz_one)."""
    return b"\x01" + (message if isinstance(message, bytes) else json.dumps(message).encode())


def stream(*frames: bytes) -> bytes:
    """A seed holding a raw stream (first byte even)."""
    return b"\x80" + b"".join(frames)


def frame(text: bytes) -> bytes:
    """Any text framed, valid JSON or not."""
    return protocol.HEADER.pack(len(text)) + text


def v2_frame(message: dict) -> bytes:
    """A v2 frame: ndarrays in ``message`` become attachments after its JSON."""
    buffers, _ = codec.encode(message)
    return b"".join(bytes(memoryview(buffer).cast("B")) for buffer in buffers)


def seeds() -> list[bytes]:
    """One stream per action and model type, valid and slightly wrong."""
    x = {"dtype": "uint8", "shape": [4], "data_b64": base64.b64encode(bytes(4)).decode()}
    img = {"dtype": "uint8", "shape": [4, 4, 3], "data_b64": base64.b64encode(bytes(48)).decode()}
    inputs = {
        "generic": {"inputs": {"x": x}}, "clip": {"mode": "image", "tensor": x},
        "vlm": {"prompt": "what?", "image": img}, "vlm_chat": {"prompt": "hi", "frames": [img], "seed": 1},
        "whisper": {"audio": [0.0, 0.5, -0.5], "language": "en", "task": "transcribe"},
        "ocr": {"mode": "recognition", "crops": [x], "language": "en"}, "depth": {"input": x},
        "pose": {"input": x, "timeout_ms": 100},
    }
    params = {"clip": {"text_hef_path": PATHS["small"]}, "ocr": {"recognition_hefs": {"en": PATHS["small"]}}}
    streams = [body({"action": action, "request_id": 1}) for action in sorted(protocol.CONTROL_ACTIONS)]
    for model_type, data in inputs.items():
        for action in ("load_model", "infer", "unload_model"):
            message = {"action": action, "model_type": model_type, "model_path": PATHS["small"],
                       "request_id": f"{action}-{model_type}", "keep_alive": "10m", "priority": "batch"}
            if model_type in params:
                message["model_params"] = params[model_type]
            if action == "infer":
                message["input_data"] = data
            streams.append(body(message))
    streams.append(stream(frame(b'{"action": "ping"'), frame(b"[1, 2]"), b"\x00\x00"))
    streams.append(stream(frame(b'{"action": "status", "request_id": "a"}'), frame(b'{"action": "ping"}')))
    streams.append(stream(protocol.HEADER.pack((1 << 20) + 1), b"{"))
    import numpy as np
    tensor = np.arange(4, dtype=np.uint8)
    streams.append(stream(v2_frame({"action": "infer", "model_type": "generic", "model_path": PATHS["small"],
                                    "request_id": 2, "input_data": {"inputs": {"x": tensor}}}),
                          frame(b'{"action": "ping", "attachments": [3, 0, 1]}') + b"abcd",
                          frame(b'{"action": "ping", "attachments": [1048577]}'),
                          frame(b'{"action": "ping", "attachments": [-1]}')))
    return streams


def write_seeds(argv: list[str]) -> None:
    corpus = next((arg for arg in argv[1:] if not arg.startswith("-")), None)
    if corpus is None:
        return
    os.makedirs(corpus, exist_ok=True)
    if not os.listdir(corpus):
        for index, seed in enumerate(seeds()):
            with open(os.path.join(corpus, f"seed-{index:03d}"), "wb") as handle:
                handle.write(seed)


def test_one_input(data: bytes) -> None:
    try:
        harness.fuzz_one(data, CONFIG)
    except Exception as exc:
        issue = harness.known_issue(exc)
        if issue is None or STRICT:
            raise
        if not KNOWN[issue.name]:
            print(f"fuzz_frames: met known issue {issue.name} ({issue.where}), not counted as a crash; "
                  f"--strict stops on it", file=sys.stderr, flush=True)
        KNOWN[issue.name] += 1


def main() -> None:
    write_seeds(sys.argv)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
