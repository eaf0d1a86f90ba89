"""whisper: speech to text through hailo_platform.genai.Speech2Text.

input_data: ``{"audio": [float, ...] | tensor, "language"?: "en",
"task"?: "transcribe"|"translate", "timeout_ms"?}``. Audio is 16 kHz mono
float32 PCM in [-1, 1], at most 30 s (480000 samples); a tensor may be
``[n]`` or ``[1, n]``. ``language`` null asks HailoRT to detect it (HailoRT
5.2 and later; 5.1 wants a language). Result:
``{"segments": [{"id", "start", "end", "text"}, ...]}`` with times in
seconds.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from .. import tensors
from ..protocol import BAD_REQUEST, RequestError, json_type, optional_number
from .base import MAX_TIMEOUT_MS, Handler, InputLimits, genai_class, hailort_version, require_object

SAMPLE_RATE = 16_000
MAX_AUDIO_S = 30
MAX_SAMPLES = SAMPLE_RATE * MAX_AUDIO_S
DEFAULT_LANGUAGE = "en"
TASKS = ("transcribe", "translate")
# The keyword form of generate_all_segments is from 5.1.1; language=None
# (detect) from 5.2 (docs/hailort-api.md).
MINIMUM_HAILORT = (5, 1, 1)
DETECTS_LANGUAGE = (5, 2)
# Whisper's language codes are two or three lowercase letters ("en", "haw").
_LANGUAGE = re.compile(r"[a-z]{2,3}")


def _audio(data: dict, limits: InputLimits) -> np.ndarray:
    if "audio" not in data:
        raise RequestError(BAD_REQUEST, "input_data.audio is required (a list of float samples or a "
                                        "float32 tensor, 16 kHz mono)")
    value = data["audio"]
    if isinstance(value, list):
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            raise RequestError(BAD_REQUEST, "input_data.audio must be a list of numbers (float samples)")
        if len(value) > MAX_SAMPLES:
            raise RequestError(BAD_REQUEST, _too_long(len(value)))
        try:
            # float64 first: the range check below sees 1e300 as it is, not as inf.
            audio = np.asarray(value, dtype=np.float64)
        except OverflowError:  # an integer too large for any float
            raise RequestError(BAD_REQUEST, "input_data.audio samples must lie in [-1, 1] (float PCM), "
                                            "got an integer beyond the float range") from None
    elif isinstance(value, dict):
        audio = tensors.decode_v1(value, where="input_data.audio", max_elements=limits.max_tensor_elements)
        if audio.dtype != np.float32:
            raise RequestError(BAD_REQUEST, f"input_data.audio must be float32 samples, got a "
                                            f"{audio.dtype.name} tensor")
        if audio.ndim == 2 and audio.shape[0] == 1:
            audio = audio.reshape(-1)
        if audio.ndim != 1:
            raise RequestError(BAD_REQUEST, f"input_data.audio must be mono: shape [n] or [1, n], "
                                            f"got {list(audio.shape)}")
    else:
        raise RequestError(BAD_REQUEST, f"input_data.audio must be a list of float samples or a "
                                        f"float32 tensor, got {json_type(value)}")
    if audio.size == 0:
        raise RequestError(BAD_REQUEST, "input_data.audio is empty")
    if audio.size > MAX_SAMPLES:
        raise RequestError(BAD_REQUEST, _too_long(audio.size))
    if not np.all(np.isfinite(audio)):
        raise RequestError(BAD_REQUEST, "input_data.audio holds NaN or infinite samples")
    peak = float(np.max(np.abs(audio)))
    if peak > 1.0:
        raise RequestError(BAD_REQUEST, f"input_data.audio samples must lie in [-1, 1] (float PCM), "
                                        f"got a peak of {peak:g}: scale 16-bit samples by 1/32768")
    return np.ascontiguousarray(audio, dtype=np.float32)


def _too_long(samples: int) -> str:
    return (f"input_data.audio has {samples} samples ({samples / SAMPLE_RATE:.1f} s), over the limit "
            f"of {MAX_SAMPLES} ({MAX_AUDIO_S} s at {SAMPLE_RATE} Hz)")


class WhisperHandler(Handler):
    model_type = "whisper"

    @classmethod
    def parse_input(cls, input_data: Any, limits: InputLimits) -> dict:
        data = require_object(input_data, "input_data")
        language = data.get("language", DEFAULT_LANGUAGE)
        if language is not None and (not isinstance(language, str) or not _LANGUAGE.fullmatch(language)):
            raise RequestError(BAD_REQUEST, f"input_data.language must be a language code like \"en\" "
                                            f"(or null to detect it), got {language!r}")
        task = data.get("task", "transcribe")
        if task not in TASKS:
            raise RequestError(BAD_REQUEST, f"input_data.task must be \"transcribe\" or \"translate\", "
                                            f"got {task!r}")
        return {
            "audio": _audio(data, limits),
            "language": language,
            "task": task,
            "timeout_ms": optional_number(data, "timeout_ms", None, minimum=1, maximum=MAX_TIMEOUT_MS,
                                          integer=True, where="input_data."),
        }

    def load(self) -> None:
        speech2text = genai_class(self.platform, "Speech2Text", self.model_type, MINIMUM_HAILORT)
        # Speech2TextTask is exported by hailo_platform.genai only.
        self.tasks = self.platform.genai.Speech2TextTask
        self.speech2text = speech2text(self.vdevice, self.model_path)

    def run(self, inputs: dict, timeout_ms: int) -> dict:
        task = getattr(self.tasks, inputs["task"].upper())
        if inputs["language"] is None and hailort_version(self.platform) < DETECTS_LANGUAGE:
            # Before 5.2 the C++ parameter is a string: None is a TypeError there.
            raise RequestError(BAD_REQUEST, f"input_data.language null (detect the language) needs HailoRT "
                                            f"5.2 or later; the installed HailoRT is "
                                            f"{getattr(self.platform, '__version__', 'unknown')}: name the "
                                            "language, e.g. \"en\"")
        # Audio positional (its name differs between sources), the rest by keyword.
        segments = self.speech2text.generate_all_segments(
            inputs["audio"], task=task, language=inputs["language"],
            timeout_ms=min(timeout_ms, inputs["timeout_ms"] or timeout_ms))
        return {"segments": [
            {"id": index, "start": round(float(segment.start_sec), 3),
             "end": round(float(segment.end_sec), 3), "text": str(segment.text)}
            for index, segment in enumerate(segments)]}

    def release(self) -> None:
        # Speech2Text.release() exists from 5.1.0 (PY:5214 in 5.2.0); the object
        # must not be used afterwards (the binding keeps a null handle).
        self.speech2text.release()
        self.speech2text = None
