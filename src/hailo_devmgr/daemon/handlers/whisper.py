"""whisper: speech to text through hailo_platform.genai.Speech2Text.

input_data: ``{"audio": [float, ...] | tensor, "language"?: "en",
"task"?: "transcribe"|"translate", "timeout_ms"?}``. Audio is 16 kHz mono
float32 PCM in [-1, 1], at most ``max_audio_s`` (config, default 600 s); a
tensor may be ``[n]`` or ``[1, n]``. Longer than 30 s, it is transcribed in
windows of at most 30 s, each cut at the quietest moment of its last 5 s,
and the segments' times are offset to the whole recording. ``language``
null, ``""`` or ``"auto"`` asks HailoRT to detect it (HailoRT 5.2 and later; 5.1
wants a language). Result: ``{"segments": [{"id", "start", "end",
"text"}, ...]}`` with times in seconds.
"""
from __future__ import annotations

import re
import time
from typing import Any

import numpy as np

from ...wire import tensors
from ...wire.protocol import BAD_REQUEST, INFERENCE_FAILED, RequestError, json_type, optional_number, shown
from .base import MAX_TIMEOUT_MS, Handler, InputLimits, genai_class, hailort_version, ms_left, require_object

SAMPLE_RATE = 16_000
# Whisper hears 30 s at a time: longer audio is cut into windows of at most
# WINDOW_S, each cut at the quietest CUT_FRAME_S stretch of its last
# CUT_SEARCH_S, so words are rarely split and nothing is heard twice.
WINDOW_S = 30
CUT_SEARCH_S = 5
CUT_FRAME_S = 0.1
MIN_TAIL_S = 1
DEFAULT_LANGUAGE = "en"
# What services send to ask for detection, besides null (hailo-whisper sends "auto").
DETECT_WORDS = ("auto", "")
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
        if len(value) > limits.max_audio_s * SAMPLE_RATE:
            raise RequestError(BAD_REQUEST, _too_long(len(value), limits))
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
    if audio.size > limits.max_audio_s * SAMPLE_RATE:
        raise RequestError(BAD_REQUEST, _too_long(audio.size, limits))
    if not np.all(np.isfinite(audio)):
        raise RequestError(BAD_REQUEST, "input_data.audio holds NaN or infinite samples")
    peak = float(np.max(np.abs(audio)))
    if peak > 1.0:
        raise RequestError(BAD_REQUEST, f"input_data.audio samples must lie in [-1, 1] (float PCM), "
                                        f"got a peak of {peak:g}: scale 16-bit samples by 1/32768")
    return np.ascontiguousarray(audio, dtype=np.float32)


def _too_long(samples: int, limits: InputLimits) -> str:
    return (f"input_data.audio has {samples} samples ({samples / SAMPLE_RATE:.1f} s), over the limit "
            f"of {limits.max_audio_s * SAMPLE_RATE} ({limits.max_audio_s} s at {SAMPLE_RATE} Hz; config "
            "max_audio_s)")


def windows(audio: np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` sample ranges of at most WINDOW_S that cover ``audio`` in order.

    Each cut is at the quietest CUT_FRAME_S of the window's last CUT_SEARCH_S
    (the latest of equally quiet ones, so silence makes few windows), and
    never leaves less than MIN_TAIL_S after it (Whisper invents words in a
    few milliseconds of audio)."""
    size, frame = WINDOW_S * SAMPLE_RATE, int(CUT_FRAME_S * SAMPLE_RATE)
    ranges, start = [], 0
    while len(audio) - start > size:
        search_end = min(start + size, len(audio) - int(MIN_TAIL_S * SAMPLE_RATE))
        search_start = max(search_end - CUT_SEARCH_S * SAMPLE_RATE, start + frame)
        frames = audio[search_start:search_end]
        frames = frames[:len(frames) // frame * frame].reshape(-1, frame)
        energy = np.mean(frames.astype(np.float64) ** 2, axis=1)
        quietest = len(energy) - 1 - int(np.argmin(energy[::-1]))
        end = search_start + quietest * frame + frame // 2
        ranges.append((start, end))
        start = end
    ranges.append((start, len(audio)))
    return ranges


class WhisperHandler(Handler):
    model_type = "whisper"

    @classmethod
    def parse_input(cls, input_data: Any, limits: InputLimits) -> dict:
        data = require_object(input_data, "input_data")
        language = data.get("language", DEFAULT_LANGUAGE)
        if language in DETECT_WORDS:
            language = None
        if language is not None and (not isinstance(language, str) or not _LANGUAGE.fullmatch(language)):
            raise RequestError(BAD_REQUEST, f"input_data.language must be a language code like \"en\" "
                                            f"(or null to detect it), got {shown(language)}")
        task = data.get("task", "transcribe")
        if task not in TASKS:
            raise RequestError(BAD_REQUEST, f"input_data.task must be \"transcribe\" or \"translate\", "
                                            f"got {shown(task)}")
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

    @classmethod
    def device_calls(cls, inputs: dict) -> int:
        return len(windows(inputs["audio"]))

    def run(self, inputs: dict, timeout_ms: int) -> dict:
        task = getattr(self.tasks, inputs["task"].upper())
        if inputs["language"] is None and hailort_version(self.platform) < DETECTS_LANGUAGE:
            # Before 5.2 the C++ parameter is a string: None is a TypeError there.
            raise RequestError(BAD_REQUEST, f"input_data.language null or \"auto\" (detect the language) "
                                            f"needs HailoRT 5.2 or later; the installed HailoRT is "
                                            f"{getattr(self.platform, '__version__', 'unknown')}: name the "
                                            "language, e.g. \"en\"")
        audio, segments = inputs["audio"], []
        timeout_ms = min(timeout_ms, inputs["timeout_ms"] or timeout_ms)
        deadline = time.monotonic() + timeout_ms / 1000  # one budget for every window
        parts = windows(audio)
        for number, (start, end) in enumerate(parts):
            left_ms = ms_left(deadline)
            if left_ms <= 0:
                # Not `timeout`, which means "never started" (docs/protocol.md 7).
                raise RequestError(INFERENCE_FAILED, f"Inference failed: transcription ran out of time after "
                                                     f"{number} of {len(parts)} windows of {WINDOW_S} s "
                                                     f"(timeout {timeout_ms} ms) [HAILO_TIMEOUT (4)]")
            offset = start / SAMPLE_RATE
            for segment in self.speech2text.generate_all_segments(
                    np.ascontiguousarray(audio[start:end]), task=task, language=inputs["language"],
                    timeout_ms=left_ms):
                segments.append({"id": len(segments), "start": round(offset + float(segment.start_sec), 3),
                                 "end": round(offset + float(segment.end_sec), 3), "text": str(segment.text)})
        return {"segments": segments}

    def release(self) -> None:
        # Speech2Text.release() exists from 5.1.0 (PY:5214 in 5.2.0); the object
        # must not be used afterwards (the binding keeps a null handle).
        self.speech2text.release()
        self.speech2text = None
