"""depth: monocular depth estimation, one image in, one depth map out.

input_data ``{"input": tensor, "timeout_ms"?}`` → a float32 tensor of the
HEF's output shape (e.g. ``[256, 320, 1]``), dequantized by HailoRT. The
HEF must have one input and one output (other HEFs: model_type generic).
"""
from __future__ import annotations

import numpy as np

from ...wire.protocol import LOAD_FAILED, RequestError
from .network import SingleInputHandler


class DepthHandler(SingleInputHandler):
    model_type = "depth"

    def check_outputs(self, names: list[str]) -> None:
        if len(names) != 1:
            raise RequestError(LOAD_FAILED, f"Failed to load model: the depth HEF {self.model_path} has "
                                            f"{len(names)} outputs {names}; depth returns one map "
                                            "(use model_type pose or generic for this HEF)")

    def result(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        [depth_map] = outputs.values()
        return depth_map
