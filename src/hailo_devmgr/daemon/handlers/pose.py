"""pose: pose estimation, one image in, every output of the HEF out.

input_data ``{"input": tensor, "timeout_ms"?}`` → ``{output_name: tensor,
...}``, one float32 tensor (dequantized by HailoRT) per output of the HEF,
e.g. the box, score and keypoint maps of a YOLOv8-pose HEF at three
scales; a HEF with a single output answers that bare tensor, as the earlier
daemon did. Decoding keypoints from them is the service's part.
"""
from __future__ import annotations

import numpy as np

from .network import SingleInputHandler


class PoseHandler(SingleInputHandler):
    model_type = "pose"

    def result(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | np.ndarray:
        if len(outputs) == 1:
            return next(iter(outputs.values()))
        return dict(outputs)
