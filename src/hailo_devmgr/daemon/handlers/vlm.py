"""vlm and vlm_chat: a vision-language model through hailo_platform.genai.VLM.

vlm: ``{"prompt", "image": tensor}`` → text.
vlm_chat: ``{"prompt", "frames": [tensor, ...], "temperature"?, "seed"?,
"max_generated_tokens"?}`` → text. ``prompt`` is a string (one user turn
with an image slot per frame) or a chat list with one ``{"type": "image"}``
slot per frame (handlers/chat.py). ``temperature`` 0 means greedy. The
context is cleared after every call, so one client's conversation never
leaks into the next request.
Frames must match the model's ``input_frame_shape()`` and
``input_frame_format_type()`` (336x336x3 uint8 on the public Qwen2-VL HEF).

``run`` answers the text (``generate_all``); ``generate(inputs, timeout_ms,
on_token)`` reads the same generation token by token through
``VLM.generate`` (``PY:4638`` at v5.1.1, ``PY:4668`` at v5.2.0) and answers
``{text, prompt_tokens, generated_tokens, prompt_ms, generation_ms,
done_reason}`` as the llm type does (handlers/generation.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ...wire.protocol import BAD_REQUEST, RequestError, optional_number
from . import chat, generation
from .base import MAX_TIMEOUT_MS, Handler, InputLimits, genai_class, hailort_version, match_stream, require_object, tensor_field, tensor_list_field

MAX_GENERATED_TOKENS = 8192
# generate_all(timeout_ms=) exists from 5.1.1 (docs/hailort-api.md).
MINIMUM_HAILORT = (5, 1, 1)
# The 5.1.1 server's MAX_FRAMES_IN_SINGLE_GENERATION (vlm_server.hpp:34).
MAX_FRAMES_BEFORE_5_2 = 5


class VlmChatHandler(Handler):
    model_type = "vlm_chat"
    sends_path_to_device = True

    @classmethod
    def parse_input(cls, input_data: Any, limits: InputLimits) -> dict:
        data = require_object(input_data, "input_data")
        where = "input_data."
        prompt = chat.prompt_field(data)
        frames = cls._frames(data, limits)
        return {
            "prompt": chat.as_chat(prompt, len(frames)),
            "frames": frames,
            "temperature": optional_number(data, "temperature", None, minimum=0, maximum=100, where=where),
            "seed": optional_number(data, "seed", None, minimum=0, maximum=2**31 - 1, integer=True, where=where),
            "max_generated_tokens": optional_number(data, "max_generated_tokens", None, minimum=1,
                                                    maximum=MAX_GENERATED_TOKENS, integer=True, where=where),
            "timeout_ms": optional_number(data, "timeout_ms", None, minimum=1, maximum=MAX_TIMEOUT_MS,
                                          integer=True, where=where),
        }

    @classmethod
    def _frames(cls, data: dict, limits: InputLimits) -> list[np.ndarray]:
        return tensor_list_field(data, "frames", limits)

    @staticmethod
    def _frame_field(index: int) -> str:
        return f"input_data.frames[{index}]"

    def load(self) -> None:
        vlm_class = genai_class(self.platform, "VLM", self.model_type, MINIMUM_HAILORT)
        self.vlm = vlm_class(self.vdevice, self.model_path)
        self.end_tokens: list[str] | None = None  # read at the first generate()

    def run(self, inputs: dict, timeout_ms: int) -> str:
        frames, options = self._checked(inputs)
        try:
            # Keywords only: HailoRT 5.2 inserted `videos` third (PY:4729).
            return self.vlm.generate_all(
                prompt=inputs["prompt"], frames=frames,
                # Never past the daemon's infer budget, or the watchdog fires.
                timeout_ms=min(inputs["timeout_ms"] or timeout_ms, timeout_ms),
                **options)
        finally:
            self.vlm.clear_context()

    def generate(self, inputs: dict, timeout_ms: int, on_token: generation.OnToken | None) -> dict:
        """The generation of ``run`` token by token; ``on_token(text) -> bool`` per piece (False cancels)."""
        frames, options = self._checked(inputs)
        if self.end_tokens is None:
            # The model's end tokens, cut from the text: get_stop_tokens PY:4898 (v5.1.1), PY:4943 (v5.2.0).
            self.end_tokens = [str(token) for token in self.vlm.get_stop_tokens()]
        # tokenize: PY:4744 (v5.1.1), PY:4789 (v5.2.0); the text only, not the image tokens.
        prompt_tokens = len(self.vlm.tokenize("\n".join(chat.texts(inputs["prompt"]))))
        try:
            # VLM.generate: keywords only (5.2 put `videos` third, PY:4668).
            result = generation.read_tokens(
                lambda: self.vlm.generate(prompt=inputs["prompt"], frames=frames, **options),
                timeout_ms=min(inputs["timeout_ms"] or timeout_ms, timeout_ms), stops=self.end_tokens,
                max_generated_tokens=inputs["max_generated_tokens"], on_token=on_token)
        finally:
            # clear_context: PY:4802 (v5.1.1), PY:4847 (v5.2.0).
            self.vlm.clear_context()
        return {"text": result["text"], "prompt_tokens": prompt_tokens,
                **{key: value for key, value in result.items() if key != "text"}}

    def load_info(self) -> dict:
        """What a client needs to make frames: the model's input frame shape and type."""
        return {"model_info": {"frame_shape": [int(size) for size in self.vlm.input_frame_shape()],
                               "frame_dtype": np.dtype(self.vlm.input_frame_format_type()).name}}

    def _checked(self, inputs: dict) -> tuple[list[np.ndarray], dict]:
        """The frames as the model takes them, and the sampling keywords."""
        shape = list(self.vlm.input_frame_shape())
        dtype = np.dtype(self.vlm.input_frame_format_type())
        frames = [match_stream(frame, shape, dtype, self._frame_field(index))
                  for index, frame in enumerate(inputs["frames"])]
        if len(frames) > MAX_FRAMES_BEFORE_5_2 and hailort_version(self.platform) < (5, 2):
            raise RequestError(BAD_REQUEST, f"input_data has {len(frames)} frames; HailoRT "
                                            f"{self.platform.__version__} takes at most {MAX_FRAMES_BEFORE_5_2} "
                                            "in one generation (5.2 and later take more)")
        # HailoRT wants temperature > 0 (genai llm.cpp:553-565); 0 means greedy (generation.sampling).
        return frames, generation.sampling(inputs)

    def release(self) -> None:
        self.vlm.release()


class VlmHandler(VlmChatHandler):
    """The single-image form of vlm_chat."""

    model_type = "vlm"

    @classmethod
    def _frames(cls, data: dict, limits: InputLimits) -> list[np.ndarray]:
        return [tensor_field(data, "image", limits)]

    @staticmethod
    def _frame_field(index: int) -> str:
        return "input_data.image"
