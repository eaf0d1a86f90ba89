"""What every model type implements, and the input checks they share.

A handler class has two halves that run in different places:

- class methods ``check_params`` and ``parse_input`` run before the device
  is touched (in a worker thread, off the event loop): they validate every
  field and decode tensors, raising ``bad_request`` errors that name the
  field;
- an instance owns the HailoRT objects of one loaded model and lives on
  the device thread only: ``load``, ``run``, ``release``, and
  ``load_info`` (extra fields of the ``load_model`` answer).

Handlers use ``platform`` (the hailo_platform-like namespace of the
backend) and nothing else of the backend, so they run unchanged on the
real and the simulated accelerator.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ...wire import tensors
from ..hailort_status import version_tuple
from ...wire.protocol import BAD_REQUEST, LOAD_FAILED, RequestError, json_type, shown

MAX_FRAMES = 32
# Longest single HailoRT call we allow a request to ask for (ms).
MAX_TIMEOUT_MS = 600_000
DEFAULT_RUN_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class InputLimits:
    max_tensor_elements: int = tensors.DEFAULT_MAX_ELEMENTS
    max_audio_s: int = 600  # whisper: longer audio is refused (config max_audio_s)


class Handler:
    """One loaded model of one model type. Subclasses set ``model_type``."""

    model_type = ""
    # Extra model files named in model_params (checked like model_path).
    path_params: tuple[str, ...] = ()
    # The other model_params a loaded model uses. check_params keeps these and
    # path_params only, so a loaded model depends on exactly the parameters
    # its cache key holds (registry.ModelSpec.identity): a parameter not
    # listed here never reaches the handler, rather than letting two requests
    # that differ in it share one loaded model.
    option_params: tuple[str, ...] = ()
    # True where HailoRT sends the path string to the chip (genai VLM, LLM):
    # the model then gets a host-only link, not /proc/self/fd/N (model_files).
    sends_path_to_device = False
    # True where a failed HailoRT run leaves the model unusable (InferModel:
    # a failed submit shuts the configured model down), so it must be reloaded.
    failed_run_breaks_model = False
    # True where the requests of one model can share a device call: the
    # handler has ``bind``, ``run_frames`` and ``batch_limit`` (registry.infer_batch).
    runs_in_batches = False

    def __init__(self, platform: Any, vdevice: Any, model_path: str, params: dict, *,
                 activate_to_run: bool = False):
        self.platform = platform
        self.vdevice = vdevice
        self.model_path = model_path
        self.params = params
        # Without HailoRT's scheduler (device.scheduling_algorithm: none) a
        # configured model runs only while activated, one at a time.
        self.activate_to_run = activate_to_run

    # -- before the device (worker thread) --------------------------------

    @classmethod
    def check_params(cls, params: dict, resolve_path: Callable[[str, str], str]) -> dict:
        """Validate ``model_params``; returns them with file paths resolved.

        ``resolve_path(path, key)`` applies the model-file rules to a path
        given in ``model_params[key]`` and returns the path to use. It runs
        twice: while the request is checked (the real path), then on the
        device thread when the model loads, on its own result, with an
        opener that returns ``/proc/self/fd/N`` (see model_files.py). So it
        must accept what it returned, and every model file it names must go
        through ``resolve_path``. Keys outside ``path_params`` and
        ``option_params`` are dropped (unknown ones are ignored, as documented)."""
        checked = {key: params[key] for key in cls.path_params + cls.option_params if key in params}
        for key in cls.path_params:
            if checked.get(key) is not None:
                value = checked[key]
                if not isinstance(value, str) or not value:
                    raise RequestError(BAD_REQUEST, f"model_params.{key} must be a path string")
                checked[key] = resolve_path(value, key)
        return checked

    @classmethod
    def parse_input(cls, input_data: Any, limits: InputLimits) -> Any:
        """Validate ``input_data`` and decode its tensors."""
        raise NotImplementedError

    @classmethod
    def device_calls(cls, inputs: Any) -> int:
        """How many HailoRT calls ``run`` makes for these inputs, each of which may
        take the whole infer budget (the watchdog allows for all of them)."""
        return 1

    # -- on the device thread ---------------------------------------------

    def load(self) -> None:
        raise NotImplementedError

    def run(self, inputs: Any, timeout_ms: int) -> Any:
        """Run one inference; returns JSON-able data with ndarrays inside."""
        raise NotImplementedError

    # Batches (``runs_in_batches``): ``run`` is then ``run_frames([bind(inputs)])[0]``.

    def bind(self, inputs: Any) -> Any:
        """One request's inputs made ready for ``run_frames``: checked against
        the model, no device call (a bad request fails alone, before the run)."""
        raise NotImplementedError

    def run_frames(self, frames: list, timeout_ms: int) -> list:
        """The results of several requests' bound inputs, from one device call."""
        raise NotImplementedError

    def batch_limit(self) -> int:
        """How many requests may share one device call now."""
        return 1

    def load_info(self) -> dict:
        """Extra fields for the ``load_model`` answer (loaded or already
        loaded), e.g. ocr's ``model_info``. Reads what the loaded objects
        already know; must not call the device."""
        return {}

    def release(self) -> None:
        raise NotImplementedError


def ms_left(deadline: float) -> int:
    """Milliseconds until a ``time.monotonic()`` deadline (0 or less once it passed):
    one budget spread over several HailoRT calls."""
    return int((deadline - time.monotonic()) * 1000)


# ---------------------------------------------------------------- HailoRT versions

def hailort_version(platform: Any) -> tuple[int, ...]:
    """``platform.__version__`` as numbers, e.g. (5, 2, 0); () when unknown."""
    return version_tuple(getattr(platform, "__version__", None))


def genai_class(platform: Any, name: str, model_type: str, minimum: tuple[int, ...]) -> Any:
    """``hailo_platform.genai.<name>``, or a load failure naming the installed version.

    The backend imports ``hailo_platform.genai`` (``import hailo_platform``
    does not); it is missing on HailoRT 4.x (Hailo-8), and the calls we make
    need ``minimum`` (see docs/hailort-api.md)."""
    version = str(getattr(platform, "__version__", "unknown"))
    needed = ".".join(map(str, minimum))
    genai = getattr(platform, "genai", None)
    if genai is None or not hasattr(genai, name):
        raise RequestError(LOAD_FAILED, f"Failed to load model: model type {model_type} needs "
                                        f"hailo_platform.genai.{name} (HailoRT {needed} or later on a "
                                        f"Hailo-10H); the installed HailoRT {version} has none")
    if hailort_version(platform) < minimum:
        raise RequestError(LOAD_FAILED, f"Failed to load model: model type {model_type} needs HailoRT "
                                        f"{needed} or later; the installed HailoRT is {version}")
    return getattr(genai, name)


# ---------------------------------------------------------------- input helpers

def require_object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise RequestError(BAD_REQUEST, f"{where} must be an object, got {json_type(value)}")
    return value


def tensor_field(data: dict, key: str, limits: InputLimits, where: str = "input_data") -> np.ndarray:
    if key not in data:
        raise RequestError(BAD_REQUEST, f"{where}.{key} is required (a tensor)")
    return tensors.decode_v1(data[key], where=f"{where}.{key}",
                             max_elements=limits.max_tensor_elements)


def tensor_list_field(data: dict, key: str, limits: InputLimits, where: str = "input_data",
                      max_items: int = MAX_FRAMES) -> list[np.ndarray]:
    value = data.get(key)
    if not isinstance(value, list) or not value:
        raise RequestError(BAD_REQUEST, f"{where}.{key} must be a non-empty list of tensors")
    if len(value) > max_items:
        raise RequestError(BAD_REQUEST, f"{where}.{key} has {len(value)} items, over the limit of {max_items}")
    return [tensors.decode_v1(item, where=f"{where}.{key}[{index}]",
                              max_elements=limits.max_tensor_elements)
            for index, item in enumerate(value)]


def choice_field(data: dict, key: str, choices: tuple[str, ...], where: str = "input_data") -> str:
    """A field that must be one of a few words, e.g. ``mode``."""
    value = data.get(key)
    if value not in choices:
        wanted = " or ".join(f'"{choice}"' for choice in choices)
        raise RequestError(BAD_REQUEST, f"{where}.{key} must be {wanted}, got {shown(value)}")
    return value


def match_stream(array: np.ndarray, shape: list, dtype: np.dtype, where: str) -> np.ndarray:
    """Check a tensor against a model stream; accept a leading batch dim of 1.

    An image stream (HWC with 3 channels, neither H nor W 3) also takes CHW
    ``[3, H, W]`` and NCHW ``[1, 3, H, W]``, transposed here to HWC: the
    layout is unambiguous, and services fall back to NCHW when they cannot
    read the HEF's shape. Returns a C-contiguous array of exactly the
    stream's shape (HailoRT requires C-contiguous buffers).
    """
    expected = tuple(int(size) for size in shape)
    got = tuple(array.shape)
    if got == (1, *expected):
        array = array.reshape(expected)
    elif _is_chw_of(got, expected):
        array = np.moveaxis(array.reshape(got[-3:]), 0, -1)
    elif got != expected:
        layouts = " (or CHW/NCHW of it)" if _is_image(expected) else ""
        raise RequestError(BAD_REQUEST, f"{where} has shape {list(got)}, the model expects {list(expected)}"
                                        f"{layouts}")
    if array.dtype != dtype:
        raise RequestError(BAD_REQUEST, f"{where} has dtype {array.dtype.name}, the model expects {dtype.name}")
    return np.ascontiguousarray(array)


def _is_image(expected: tuple) -> bool:
    return len(expected) == 3 and expected[2] == 3 and 3 not in expected[:2]


def _is_chw_of(got: tuple, expected: tuple) -> bool:
    """``got`` is ``expected`` (HWC, 3 channels) as CHW or NCHW with N = 1."""
    if not _is_image(expected):
        return False
    height, width, channels = expected
    return got in ((channels, height, width), (1, channels, height, width))
