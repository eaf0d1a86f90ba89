"""One HEF network run through HailoRT's InferModel API.

Shared by the handlers of image and tensor models (generic, clip, and the
ones to come: depth, pose, ocr). Device thread only.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..protocol import BAD_REQUEST, RequestError
from .base import match_stream

# FormatType values (HailoRT: AUTO=0, UINT8=1, UINT16=2, FLOAT32=3) by name,
# so this module needs no import of the platform to map them.
_DTYPES = {"UINT8": np.dtype("uint8"), "UINT16": np.dtype("uint16"), "FLOAT32": np.dtype("float32")}


def stream_dtype(stream: Any) -> np.dtype:
    """The numpy dtype of a stream's current format.

    AUTO keeps the HEF's own (quantized) format, which HailoRT reports as
    the concrete type once the model is created; we treat a remaining AUTO
    as UINT8, the usual quantized type (uncertain: not seen on hardware).
    """
    name = getattr(stream.format.type, "name", str(stream.format.type)).split(".")[-1]
    return _DTYPES.get(name, np.dtype("uint8"))


class Network:
    def __init__(self, platform: Any, vdevice: Any, path: str, *, output_format: str | None = None):
        self.platform = platform
        self.vdevice = vdevice
        self.path = path
        self.output_format = output_format
        self.model = None
        self.configured = None

    def load(self) -> None:
        self.model = self.vdevice.create_infer_model(self.path)
        if self.output_format:
            wanted = getattr(self.platform.FormatType, self.output_format)
            for stream in self.model.outputs:
                stream.set_format_type(wanted)
        self.configured = self.model.configure()

    @property
    def input_names(self) -> list[str]:
        return list(self.model.input_names)

    @property
    def output_names(self) -> list[str]:
        return list(self.model.output_names)

    def input_spec(self, name: str) -> tuple[list, np.dtype]:
        stream = self.model.input(name)
        return list(stream.shape), stream_dtype(stream)

    def run(self, inputs: dict[str, np.ndarray], timeout_ms: int, where: str = "input_data") -> dict:
        """Bind inputs by name, run once, return outputs by name."""
        expected = set(self.input_names)
        if set(inputs) != expected:
            raise RequestError(BAD_REQUEST, f"{where} must name exactly the model inputs "
                                            f"{sorted(expected)}, got {sorted(inputs)}")
        buffers = {}
        for name, array in inputs.items():
            shape, dtype = self.input_spec(name)
            buffers[name] = match_stream(array, shape, dtype, f"{where} {name!r}")
        bindings = self.configured.create_bindings()
        for name, buffer in buffers.items():
            bindings.input(name).set_buffer(buffer)
        outputs = {}
        for name in self.output_names:
            stream = self.model.output(name)
            outputs[name] = np.empty(list(stream.shape), dtype=stream_dtype(stream))
            bindings.output(name).set_buffer(outputs[name])
        self.configured.run([bindings], timeout_ms)
        return outputs

    def release(self) -> None:
        if self.configured is not None:
            self.configured.shutdown()
        self.configured = None
        self.model = None
