"""generic: any HEF, named inputs and outputs, formats from the HEF.

input_data ``{"inputs": {name: tensor}}`` → result ``{"outputs": {name: tensor}}``.
"""
from __future__ import annotations

from typing import Any

from .base import Handler, InputLimits, require_object, tensor_field
from .network import Network


class GenericHandler(Handler):
    failed_run_breaks_model = True  # a run through InferModel (network.py)
    model_type = "generic"
    runs_in_batches = True

    @classmethod
    def parse_input(cls, input_data: Any, limits: InputLimits) -> dict:
        data = require_object(input_data, "input_data")
        named = require_object(data.get("inputs"), "input_data.inputs")
        return {str(name): tensor_field(named, name, limits, "input_data.inputs") for name in named}

    def load(self) -> None:
        self.network = Network(self, self.model_path)
        self.network.load()

    def run(self, inputs: dict, timeout_ms: int) -> dict:
        return self.run_frames([self.bind(inputs)], timeout_ms)[0]

    def bind(self, inputs: dict) -> dict:
        return self.network.bind(inputs, where="input_data.inputs")

    def run_frames(self, frames: list[dict], timeout_ms: int) -> list[dict]:
        return [{"outputs": outputs} for outputs in self.network.run_frames(frames, timeout_ms)]

    def batch_limit(self) -> int:
        return self.network.batch_limit()

    def release(self) -> None:
        self.network.release()
