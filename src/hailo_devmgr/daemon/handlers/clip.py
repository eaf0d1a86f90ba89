"""clip: image and text encoders from two HEFs, one embedding out.

model_params: ``image_hef_path`` (default: model_path), ``text_hef_path``
(needed for text mode), ``text_input_layer`` / ``text_output_layer`` (stream
names, default: the text HEF's only stream).
input_data: ``{"mode": "image"|"text", "tensor": tensor, "timeout_ms"?}``.
Image: UINT8 in (e.g. 224x224x3). Text: the tokenised/embedded prompt the
service prepares, as float32 (the text HEF's inputs are set to FLOAT32). Result: a float32
embedding tensor.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ...wire.protocol import BAD_REQUEST, RequestError, optional_number, optional_str
from .base import MAX_TIMEOUT_MS, Handler, InputLimits, choice_field, require_object, tensor_field
from .network import Network

MODES = ("image", "text")


class ClipHandler(Handler):
    failed_run_breaks_model = True  # a run through InferModel (network.py)
    model_type = "clip"
    path_params = ("image_hef_path", "text_hef_path")
    option_params = ("text_input_layer", "text_output_layer")

    @classmethod
    def check_params(cls, params, resolve_path):
        checked = super().check_params(params, resolve_path)
        for key in ("text_input_layer", "text_output_layer"):
            optional_str(checked, key, None, where="model_params.")
        return checked

    @classmethod
    def parse_input(cls, input_data: Any, limits: InputLimits) -> dict:
        data = require_object(input_data, "input_data")
        mode = choice_field(data, "mode", MODES)
        return {
            "mode": mode,
            "tensor": tensor_field(data, "tensor", limits),
            "timeout_ms": optional_number(data, "timeout_ms", None, minimum=1, maximum=MAX_TIMEOUT_MS,
                                          integer=True, where="input_data."),
        }

    def load(self) -> None:
        self.image = Network(self, self.params.get("image_hef_path") or self.model_path,
                             output_format="FLOAT32")
        self.text = None
        self.image.load()
        if self.params.get("text_hef_path"):
            # The text encoder's inputs are quantized in the HEF; services send
            # float32 token embeddings, which HailoRT quantizes once told so.
            self.text = Network(self, self.params["text_hef_path"],
                                input_format="FLOAT32", output_format="FLOAT32")
            try:
                self.text.load()
            except BaseException:
                self.image.release()
                raise

    def run(self, inputs: dict, timeout_ms: int) -> np.ndarray:
        network = self.image if inputs["mode"] == "image" else self.text
        if network is None:
            raise RequestError(BAD_REQUEST, "text mode needs model_params.text_hef_path when the model is loaded")
        timeout_ms = min(timeout_ms, inputs["timeout_ms"] or timeout_ms)
        in_name = self._layer(network, "input")
        outputs = network.run({in_name: inputs["tensor"]}, timeout_ms, where="input_data.tensor")
        out_name = self._layer(network, "output")
        return outputs[out_name].astype(np.float32, copy=False)

    def _layer(self, network: Network, kind: str) -> str:
        names = network.input_names if kind == "input" else network.output_names
        wanted = self.params.get(f"text_{kind}_layer") if network is self.text else None
        if wanted:
            if wanted not in names:
                raise RequestError(BAD_REQUEST, f"model_params.text_{kind}_layer {wanted!r} is not one of {names}")
            return wanted
        if len(names) != 1:
            raise RequestError(BAD_REQUEST, f"the HEF has several {kind}s {names}: "
                                            f"set model_params.text_{kind}_layer")
        return names[0]

    def release(self) -> None:
        if self.text is not None:
            self.text.release()
        self.image.release()
