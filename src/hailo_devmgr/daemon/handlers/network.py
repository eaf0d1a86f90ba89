"""One HEF network run through HailoRT's InferModel API.

Shared by the handlers of image and tensor models (generic, clip, ocr,
depth, pose); ``SingleInputHandler`` is the common half of depth and pose.
Device thread only, except the class methods that parse input.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import numpy as np

from ...wire.protocol import BAD_REQUEST, LOAD_FAILED, RequestError, optional_number
from .base import MAX_TIMEOUT_MS, Handler, InputLimits, match_stream, ms_left, require_object, tensor_field

# FormatType values (HailoRT: AUTO=0, UINT8=1, UINT16=2, FLOAT32=3) by name,
# so this module needs no import of the platform to map them.
_DTYPES = {"UINT8": np.dtype("uint8"), "UINT16": np.dtype("uint16"), "FLOAT32": np.dtype("float32")}

# Requests for one model that wait in a row run as one HailoRT run() over
# their bindings (registry.infer_batch): the async queue gets several frames
# at once, and the per-call work is paid once. Bounded so a batch's results,
# made before their clients' bounds see them, stay small.
MAX_BATCH_FRAMES = 8
MAX_BATCH_RESULT_BYTES = 1 << 20


def stream_dtype(stream: Any) -> np.dtype:
    """The numpy dtype of a stream's current format.

    HailoRT resolves AUTO to the chip's own type (UINT8, UINT16, or FLOAT32
    for NMS) when the model is created, and streams report that concrete
    type. A stream that still says AUTO (or a type we do not know) is not
    guessed at: the buffer size would be wrong, so it is a load failure.
    """
    name = getattr(stream.format.type, "name", str(stream.format.type)).split(".")[-1]
    if name not in _DTYPES:
        raise RequestError(LOAD_FAILED, f"Failed to load model: stream {stream.name!r} reports format type "
                                        f"{name}, not one of {', '.join(_DTYPES)}; the daemon cannot size "
                                        "its buffer")
    return _DTYPES[name]


class Network:
    def __init__(self, handler: Handler, path: str, *, output_format: str | None = None,
                 input_format: str | None = None, batch_size: int | None = None):
        self.platform = handler.platform
        self.vdevice = handler.vdevice
        self.activate_to_run = handler.activate_to_run
        self.path = path
        self.output_format = output_format
        # Inputs of a quantized HEF are quantized too; a client that sends
        # float32 needs FLOAT32 set here (HailoRT then quantizes on the host).
        self.input_format = input_format
        self.batch_size = batch_size  # None: HailoRT chooses
        self.model = None
        self.configured = None
        self.queue_size = 1
        # Fixed once configured (formats are set before configure): read per run otherwise.
        self._inputs: dict[str, tuple[list, np.dtype]] = {}
        self._outputs: list[tuple[str, tuple, np.dtype]] = []
        self._batch_limit = 1   # by result bytes, once the outputs are known (batch_limit)

    def load(self) -> None:
        self.model = self.vdevice.create_infer_model(self.path)
        for streams, format_name in ((self.model.inputs, self.input_format),
                                     (self.model.outputs, self.output_format)):
            if format_name:
                wanted = getattr(self.platform.FormatType, format_name)
                for stream in streams:
                    stream.set_format_type(wanted)
        for stream in (*self.model.inputs, *self.model.outputs):
            stream_dtype(stream)  # every buffer size known before anything runs
        if self.batch_size is not None:
            self.model.set_batch_size(self.batch_size)
        self.configured = self.model.configure()
        # run() submits its bindings one by one; more than the async queue
        # holds fails with QUEUE_IS_FULL and shuts the model down.
        self.queue_size = max(int(self.configured.get_async_queue_size()), 1)
        self._inputs = {name: (list(stream.shape), stream_dtype(stream))
                        for name, stream in ((name, self.model.input(name)) for name in self.model.input_names)}
        self._outputs = [(name, tuple(stream.shape), stream_dtype(stream))
                         for name, stream in ((name, self.model.output(name)) for name in self.model.output_names)]
        frame_bytes = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self._outputs)
        self._batch_limit = max(1, min(MAX_BATCH_FRAMES, MAX_BATCH_RESULT_BYTES // max(frame_bytes, 1)))

    @property
    def input_names(self) -> list[str]:
        return list(self.model.input_names)

    @property
    def output_names(self) -> list[str]:
        return list(self.model.output_names)

    def input_spec(self, name: str) -> tuple[list, np.dtype]:
        return self._inputs[name]

    def only_input(self, kind: str) -> str:
        """The name of the network's one input; a load failure if it has several."""
        names = self.input_names
        if len(names) != 1:
            raise RequestError(LOAD_FAILED, f"Failed to load model: the {kind} HEF {self.path} has "
                                            f"{len(names)} inputs {names}; {kind} takes one "
                                            "(use model_type generic for this HEF)")
        return names[0]

    def bind(self, inputs: dict[str, np.ndarray], where: str = "input_data") -> dict[str, np.ndarray]:
        """One frame's input buffers, by name, checked against the model's
        inputs (no device call: a bad frame fails before anything runs)."""
        expected = self._inputs.keys()
        if inputs.keys() != expected:
            raise RequestError(BAD_REQUEST, f"{where} must name exactly the model inputs "
                                            f"{sorted(expected)}, got {sorted(inputs)}")
        buffers = {}
        for name, array in inputs.items():
            shape, dtype = self.input_spec(name)
            buffers[name] = match_stream(array, shape, dtype, f"{where} {name!r}")
        return buffers

    def run(self, inputs: dict[str, np.ndarray], timeout_ms: int, where: str = "input_data") -> dict:
        """Bind inputs by name, run once, return outputs by name."""
        return self.run_frames([self.bind(inputs, where)], timeout_ms)[0]

    def batch_limit(self) -> int:
        """How many frames of different requests may share one run: at most
        MAX_BATCH_FRAMES, and their results at most MAX_BATCH_RESULT_BYTES
        (results are counted against their clients only once made)."""
        return self._batch_limit

    def run_single(self, frames: list[np.ndarray], timeout_ms: int, where: list[str],
                   chunk: int | None = None) -> list[dict]:
        """Run a one-input network on several frames (a batch per ``chunk``).

        Every frame is checked against the input before anything runs;
        ``where[i]`` names frame i in errors. Returns outputs by name per frame.
        """
        name = self.input_names[0]
        shape, dtype = self.input_spec(name)
        buffers = [{name: match_stream(frame, shape, dtype, label)} for frame, label in zip(frames, where)]
        step = chunk or len(buffers) or 1
        results: list[dict] = []
        for start in range(0, len(buffers), step):
            results.extend(self.run_frames(buffers[start:start + step], timeout_ms))
        return results

    def run_frames(self, frames: list[dict[str, np.ndarray]], timeout_ms: int) -> list[dict]:
        """``run`` over the frames' bindings (from ``bind``), at most the async
        queue's size per call; outputs by name per frame."""
        results: list[dict] = []
        deadline = time.monotonic() + timeout_ms / 1000  # one budget for every chunk
        for start in range(0, len(frames), self.queue_size):
            results.extend(self._run_queued(frames[start:start + self.queue_size], max(ms_left(deadline), 1)))
        return results

    def _run_queued(self, frames: list[dict[str, np.ndarray]], timeout_ms: int) -> list[dict]:
        """One ``run`` call over bindings that fit the async queue."""
        bindings_list, results = [], []
        for buffers in frames:
            bindings = self.configured.create_bindings()
            for name, buffer in buffers.items():
                bindings.input(name).set_buffer(buffer)
            outputs = {}
            for name, shape, dtype in self._outputs:
                outputs[name] = np.empty(shape, dtype=dtype)
                bindings.output(name).set_buffer(outputs[name])
            bindings_list.append(bindings)
            results.append(outputs)
        self.configured.wait_for_async_ready(timeout_ms, frames_count=len(bindings_list))
        if self.activate_to_run:
            with self._activated():
                self.configured.run(bindings_list, timeout_ms)
        else:   # HailoRT's scheduler runs it (the default)
            self.configured.run(bindings_list, timeout_ms)
        return results

    @contextlib.contextmanager
    def _activated(self):
        """No scheduler: HailoRT runs only the one activated model (72 otherwise)."""
        self.configured.activate()
        try:
            yield
        finally:
            self.configured.deactivate()

    def release(self) -> None:
        if self.configured is not None:
            self.configured.shutdown()
        self.configured = None
        self.model = None
        self._inputs, self._outputs = {}, []
        self._batch_limit = 1


class SingleInputHandler(Handler):
    """A one-input image model: ``{"input": tensor, "timeout_ms"?}``.

    Outputs come back as FLOAT32 (HailoRT dequantizes them); subclasses
    shape the result in ``result``.
    """

    failed_run_breaks_model = True  # a run through InferModel (network.py)

    @classmethod
    def parse_input(cls, input_data: Any, limits: InputLimits) -> dict:
        data = require_object(input_data, "input_data")
        return {
            "input": tensor_field(data, "input", limits),
            "timeout_ms": optional_number(data, "timeout_ms", None, minimum=1, maximum=MAX_TIMEOUT_MS,
                                          integer=True, where="input_data."),
        }

    def load(self) -> None:
        self.network = Network(self, self.model_path, output_format="FLOAT32")
        self.network.load()
        try:
            self.network.only_input(self.model_type)
            self.check_outputs(self.network.output_names)
        except BaseException:
            self.network.release()
            raise

    def check_outputs(self, names: list[str]) -> None:
        """Raise a load failure if the HEF's outputs do not suit the type."""

    def run(self, inputs: dict, timeout_ms: int) -> Any:
        timeout_ms = min(timeout_ms, inputs["timeout_ms"] or timeout_ms)
        [outputs] = self.network.run_single([inputs["input"]], timeout_ms, ["input_data.input"])
        return self.result(outputs)

    def result(self, outputs: dict[str, np.ndarray]) -> Any:
        raise NotImplementedError

    def release(self) -> None:
        self.network.release()
