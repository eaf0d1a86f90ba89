"""ocr: text detection and recognition HEFs (PaddleOCR-style), one model.

model_params: ``detection_hef_path`` (default: model_path),
``recognition_hefs`` ``{language: path}`` (optional), ``batch_sizes``
``{language: n}`` (optional: the batch size a recognition HEF is
configured with; default HailoRT's choice).

input_data:
- ``{"mode": "detection", "image": tensor, "timeout_ms"?}`` → the detection
  map (float32 tensor of the detection HEF's output; ``{name: tensor}`` if it
  has several outputs);
- ``{"mode": "recognition", "language"?, "crops": [tensor, ...],
  "batch_size"?, "timeout_ms"?}`` → a list with one float32 logits tensor
  per crop, in order (``{name: tensor}`` per crop for a several-output HEF).
  ``language`` may be left out when the model has one recognition HEF;
  ``batch_size`` is how many crops go to the device per run (default: the
  language's configured batch size, else 1). A run never submits more
  crops than HailoRT's async queue holds (network.py): more would fail with
  HAILO_QUEUE_IS_FULL and shut the model down.

The ``load_model`` answer carries ``model_info`` with
``detection_input_shape`` (as the earlier daemon's did) and, as additions,
``recognition_input_shapes`` ``{language: shape}``.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from ...wire.protocol import BAD_REQUEST, RequestError, json_type, optional_number, optional_str
from .base import MAX_TIMEOUT_MS, Handler, InputLimits, choice_field, require_object, tensor_field, tensor_list_field
from .network import Network

MODES = ("detection", "recognition")
MAX_CROPS = 256
MAX_BATCH_SIZE = 64
# A language key: "en", "zh", "latin", "en_v4", ...
_LANGUAGE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


def _outputs(outputs: dict[str, np.ndarray]) -> Any:
    """One output as its tensor; several as a dict by name."""
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    return dict(outputs)


class OcrHandler(Handler):
    failed_run_breaks_model = True  # a run through InferModel (network.py)
    model_type = "ocr"
    path_params = ("detection_hef_path",)
    option_params = ("recognition_hefs", "batch_sizes")  # files too, checked below

    @classmethod
    def check_params(cls, params, resolve_path):
        checked = super().check_params(params, resolve_path)
        hefs = checked.get("recognition_hefs")
        if hefs is None:
            hefs = {}
        if not isinstance(hefs, dict):
            raise RequestError(BAD_REQUEST, f"model_params.recognition_hefs must be an object "
                                            f"{{language: path}}, got {json_type(hefs)}")
        resolved = {}
        for language, path in hefs.items():
            if not _LANGUAGE.fullmatch(language):
                raise RequestError(BAD_REQUEST, f"model_params.recognition_hefs: {language!r} is not a "
                                                "language key (letters, digits, _ or -)")
            if not isinstance(path, str) or not path:
                raise RequestError(BAD_REQUEST, f"model_params.recognition_hefs.{language} must be a "
                                                "path string")
            resolved[language] = resolve_path(path, f"recognition_hefs.{language}")
        checked["recognition_hefs"] = resolved
        sizes = checked.get("batch_sizes")
        if sizes is None:
            sizes = {}
        if not isinstance(sizes, dict):
            raise RequestError(BAD_REQUEST, f"model_params.batch_sizes must be an object "
                                            f"{{language: n}}, got {json_type(sizes)}")
        batch_sizes = {}
        for language in sizes:
            if language not in resolved:
                raise RequestError(BAD_REQUEST, f"model_params.batch_sizes.{language}: no such language "
                                                f"in model_params.recognition_hefs {sorted(resolved)}")
            size = optional_number(sizes, language, None, minimum=1, maximum=MAX_BATCH_SIZE, integer=True,
                                   where="model_params.batch_sizes.")
            if size is not None:
                batch_sizes[language] = size
        checked["batch_sizes"] = batch_sizes
        return checked

    @classmethod
    def parse_input(cls, input_data: Any, limits: InputLimits) -> dict:
        data = require_object(input_data, "input_data")
        mode = choice_field(data, "mode", MODES)
        where = "input_data."
        parsed = {"mode": mode,
                  "timeout_ms": optional_number(data, "timeout_ms", None, minimum=1, maximum=MAX_TIMEOUT_MS,
                                                integer=True, where=where)}
        if mode == "detection":
            parsed["image"] = tensor_field(data, "image", limits)
            return parsed
        language = optional_str(data, "language", None, where=where)
        if language is not None and not language:
            raise RequestError(BAD_REQUEST, "input_data.language must not be empty")
        parsed["language"] = language
        parsed["crops"] = tensor_list_field(data, "crops", limits, max_items=MAX_CROPS)
        parsed["batch_size"] = optional_number(data, "batch_size", None, minimum=1, maximum=MAX_BATCH_SIZE,
                                               integer=True, where=where)
        return parsed

    # -- device thread ------------------------------------------------------

    def load(self) -> None:
        self.detection = Network(self, self.params.get("detection_hef_path") or self.model_path,
                                 output_format="FLOAT32")
        self.recognition: dict[str, Network] = {}
        loaded: list[Network] = []
        try:
            self.detection.load()
            loaded.append(self.detection)
            self.detection.only_input("OCR detection")
            for language, path in self.params.get("recognition_hefs", {}).items():
                network = Network(self, path, output_format="FLOAT32",
                                  batch_size=self.params.get("batch_sizes", {}).get(language))
                network.load()
                loaded.append(network)
                network.only_input(f"OCR recognition ({language})")
                self.recognition[language] = network
        except BaseException:
            for network in reversed(loaded):
                network.release()
            raise

    def load_info(self) -> dict:
        shape, _ = self.detection.input_spec(self.detection.input_names[0])
        return {"model_info": {
            "detection_input_shape": shape,
            "recognition_input_shapes": {language: network.input_spec(network.input_names[0])[0]
                                         for language, network in self.recognition.items()},
        }}

    def run(self, inputs: dict, timeout_ms: int) -> Any:
        timeout_ms = min(timeout_ms, inputs["timeout_ms"] or timeout_ms)
        if inputs["mode"] == "detection":
            [outputs] = self.detection.run_single([inputs["image"]], timeout_ms, ["input_data.image"])
            return _outputs(outputs)
        language = self._language(inputs["language"])
        network = self.recognition[language]
        crops = inputs["crops"]
        chunk = inputs["batch_size"] or self.params.get("batch_sizes", {}).get(language) or 1
        results = network.run_single(crops, timeout_ms, [f"input_data.crops[{i}]" for i in range(len(crops))],
                                     chunk=chunk)
        return [_outputs(outputs) for outputs in results]

    def _language(self, wanted: str | None) -> str:
        languages = sorted(self.recognition)
        if not languages:
            raise RequestError(BAD_REQUEST, "recognition mode needs model_params.recognition_hefs when the "
                                            "model is loaded")
        if wanted is None:
            if len(languages) == 1:
                return languages[0]
            raise RequestError(BAD_REQUEST, f"input_data.language is required: the model has recognition "
                                            f"HEFs for {languages}")
        if wanted not in self.recognition:
            raise RequestError(BAD_REQUEST, f"input_data.language {wanted!r} has no recognition HEF; "
                                            f"the model has {languages}")
        return wanted

    def release(self) -> None:
        for network in self.recognition.values():
            network.release()
        self.detection.release()
