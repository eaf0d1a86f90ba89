"""A simulated Hailo accelerator that looks like ``hailo_platform`` to handlers.

``SimulatedBackend.platform`` imitates the parts of the HailoRT Python API the
daemon uses (docs: /work/shared/HAILORT.md, "Checklist for the simulated
backend"): ``VDevice`` and its params, ``FormatType``,
``HailoSchedulingAlgorithm``, infer models (``InferModel`` ->
``ConfiguredInferModel`` -> bindings, ``run`` / ``run_async``), ``genai.VLM``,
``genai.LLM``, ``genai.Speech2Text``, and the exception classes with HailoRT's
names, texts and status numbers. Handlers therefore run unchanged on this and
on real hardware.

What a simulated model file ("HEF") holds:

* empty file -> ``HailoRTInvalidHEFException`` (26); missing or unreadable
  -> ``libhailort failed with error: 13 (HAILO_OPEN_FILE_FAILURE)``;
* a YAML mapping describes the model: ``inputs`` / ``outputs`` lists of
  ``{name, shape: [..], format: UINT8|UINT16|FLOAT32}``, ``memory_mb``; for
  genai models ``memory_mb``, ``frame_shape`` and ``context_capacity``;
* anything else (a real HEF is binary) gets the defaults: one input
  ``input_layer1`` of ``settings.image_shape`` (224x224x3) UINT8, one output
  ``output_layer1`` of ``[settings.embedding_size]`` (512) FLOAT32,
  ``settings.model_memory_mb`` (512) of device memory; VLM frames of
  ``settings.vlm_frame_shape`` (336x336x3) uint8.

Behaviour: outputs are a pure function of (model file content, output name,
input bytes); ``configure()`` and genai constructors sleep ``load_ms`` and
reserve device memory (81 when ``device_memory_mb`` or the limit of 8 loaded
networks is exceeded); one inference sleeps ``infer_ms`` (or a request's ``simulate_ms``:
``SimulatedBackend.request_options`` and ``request_scope``); a genai LLM generation takes
``infer_ms`` for the prompt and ``token_ms`` per token, each token made as
it is read (see _GenAIModel); ``group_id "UNIQUE"`` takes an
exclusive ``flock`` on ``settings.lock_path`` (74 for a second owner). Tests
can read ``backend.calls``, replace ``backend.sleep`` with a fake clock, and
inject faults with ``backend.inject_fault``.

Where the HailoRT sources we read stop, the choice made here is marked
"uncertain" in a comment.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import enum
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import threading
import time
import types
import zlib
from dataclasses import dataclass

import numpy as np
import yaml

from .. import hailort_status
from ..hailort_status import COMMUNICATION_CLOSED, DRIVER_OPERATION_FAILED, INVALID_HEF, INVALID_OPERATION, NOT_FOUND, OPEN_FILE_FAILURE, OUT_OF_PHYSICAL_DEVICES, RESOURCE_EXHAUSTED, TIMEOUT
from . import hailort_api, recorded
from ...wire.protocol import FORBIDDEN, RequestError, optional_number
from .hailo import HailoBackend

log = logging.getLogger(__name__)

REQUEST_KNOBS = ("simulate_ms", "simulate_hang_ms")   # in model_params (request_options)
MAX_SIMULATE_MS = 600_000
DEVICE_ID = "0001:01:00.0"
ARCHITECTURE = "HAILO10H"
FW_VERSION = "5.3.0 (simulated)"
UNIQUE_GROUP = "UNIQUE"

# hailort.h numbers the daemon never classifies, so hailort_status lacks them.
INVALID_ARGUMENT = 2
_EXTRA_NAMES = {INVALID_ARGUMENT: "HAILO_INVALID_ARGUMENT", 3: "HAILO_OUT_OF_HOST_MEMORY",
                8: "HAILO_INTERNAL_FAILURE", 63: "HAILO_STREAM_ABORT", 72: "HAILO_STREAM_NOT_ACTIVATED",
                82: "HAILO_QUEUE_IS_FULL"}
STREAM_ABORT = 63
STREAM_NOT_ACTIVATED = 72
QUEUE_IS_FULL = 82
# What get_async_queue_size() answers unless a model description says otherwise.
DEFAULT_ASYNC_QUEUE_SIZE = 4

# HAILORT.md: 81 also comes when the network-group limit of 8 runs out.
NETWORK_GROUP_LIMIT = 8
DEFAULT_CONTEXT_CAPACITY = 4096
# How many prompt words a generated answer repeats.
ECHO_WORDS = 12
END_TOKEN = "<|im_end|>"
# What a simulated LLM or VLM says past its end token (when stop tokens replaced it),
# and how many tokens a generation makes unless asked or the model's YAML says.
FILLER_WORDS = ("and ", "so ", "on ")
DEFAULT_MAX_GENERATED_TOKENS = 256
HANG_LIMIT_S = 3600.0
# Speech2Text: the audio rate HailoRT expects, and the simulated segment length.
SPEECH_SAMPLE_RATE = 16000
SPEECH_SEGMENT_S = 5.0
# Larger files are taken for real (binary) HEFs without trying YAML.
YAML_SNIFF_BYTES = 1024 * 1024
# How many operations backend.calls remembers (oldest dropped first).
CALL_LOG_ENTRIES = 10_000


# ---------------------------------------------------------------- exceptions

class HailoRTException(Exception):
    """Base of pyhailort's errors."""


class HailoRTTimeout(HailoRTException):
    pass


class HailoRTInvalidArgumentException(HailoRTException):
    pass


class HailoRTNotFoundException(HailoRTException):
    pass


class HailoRTInvalidHEFException(HailoRTException):
    pass


class HailoRTInvalidOperationException(HailoRTException):
    pass


class HailoCommunicationClosedException(HailoRTException):
    pass


class HailoRTDriverOperationFailedException(HailoRTException):
    pass


class HailoRTStreamAborted(HailoRTException):
    pass


class HailoRTStatusException(Exception):
    """The binding's raw status error; ``args[0]`` is the number as text ("81").

    pyhailort does ``int(exc.args[0])`` on it, so the binding stores text.
    Its base depends on the version (hailort_api/*.yaml, ``exceptions``):
    plain ``Exception`` up to 5.1.1 (pyhailort.cpp:876), HailoRTException from
    5.2.0 (pyhailort.cpp:882), see ``_RaisedUnderHailoRTException``.
    """


class _RaisedUnderHailoRTException(HailoRTStatusException, HailoRTException):
    """HailoRTStatusException as HailoRT 5.2 registers it: a HailoRTException."""


# Typed classes and texts as pyhailort's ExceptionWrapper chooses them.
_TYPED_ERRORS = {
    TIMEOUT: (HailoRTTimeout,
              "Received a timeout - hailort has failed because a timeout had occurred"),
    INVALID_OPERATION: (HailoRTInvalidOperationException, "Invalid operation"),
    INVALID_ARGUMENT: (HailoRTInvalidArgumentException, "Invalid argument"),
    NOT_FOUND: (HailoRTNotFoundException, "Item not found"),
    INVALID_HEF: (HailoRTInvalidHEFException, "Invalid HEF"),
    DRIVER_OPERATION_FAILED: (HailoRTDriverOperationFailedException,
                              "Failure in hailort driver ioctl"),
    STREAM_ABORT: (HailoRTStreamAborted, "Stream was aborted"),
    COMMUNICATION_CLOSED: (HailoCommunicationClosedException,
                           "Communication closed failure. Check server-client connection"),
}


def status_name(number: int) -> str:
    return hailort_status.NAMES.get(number) or _EXTRA_NAMES.get(number) or f"HAILO_STATUS_{number}"


def status_error(number: int, detail: str = "") -> HailoRTException:
    """The exception pyhailort raises for a failed call, chained from the raw status.

    Typed classes carry a generic text (the real one points at hailort.log;
    we append the detail instead); other numbers give the plain
    ``libhailort failed with error: N (NAME)``, exactly.
    """
    cls, text = _TYPED_ERRORS.get(number, (HailoRTException, None))
    if text is None:
        text = f"libhailort failed with error: {number} ({status_name(number)})"
        if detail:
            log.debug("simulated hailort: %s: %s", status_name(number), detail)
    elif detail:
        text = f"{text}: {detail}"
    error = cls(text)
    error.__cause__ = HailoRTStatusException(str(number))
    return error


def raw_status_error(number: int, under_hailort_exception: bool = False) -> HailoRTStatusException:
    """What the genai constructors raise: unwrapped, ``str()`` is just the number."""
    cls = _RaisedUnderHailoRTException if under_hailort_exception else HailoRTStatusException
    return cls(str(number))


# ------------------------------------------------------------- enumerations

class FormatType(enum.IntEnum):
    AUTO = 0
    UINT8 = 1
    UINT16 = 2
    FLOAT32 = 3


class HailoSchedulingAlgorithm(enum.IntEnum):
    NONE = 0
    ROUND_ROBIN = 1


class DeviceArchitectureTypes(enum.IntEnum):
    HAILO8_A0 = 0
    HAILO8 = 1
    HAILO8L = 2
    HAILO15H = 3
    PLUTO = 4
    HAILO15M = 5
    HAILO10H = 6


class LLMGeneratorCompletionStatus(enum.IntEnum):
    # hailort llm.hpp:211-216 (v5.1.1, v5.2.0).
    GENERATING = 0
    MAX_TOKENS_REACHED = 1
    LOGICAL_END_OF_GENERATION = 2
    ABORTED = 3


_DTYPES = {FormatType.UINT8: np.dtype(np.uint8), FormatType.UINT16: np.dtype(np.uint16),
           FormatType.FLOAT32: np.dtype(np.float32)}


# ------------------------------------------------------------ chip internals

class _FaultPlan:
    """Faults a test armed; consumed by the next device operations.

    * ``raise``: the next ``count`` operations raise HailoRT errors with
      ``status`` (typed or plain, as pyhailort would; the genai
      constructors raise the raw status exception);
    * ``hang``: the next ``count`` operations block until ``release_hang()``
      (or HANG_LIMIT_S), then carry on normally;
    * ``lose_device``: every operation on the VDevices open now (and their
      models) raises COMMUNICATION_CLOSED (62); a new VDevice works again.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._raise_status: int | None = None
        self._raise_left = 0
        self._hang_left = 0
        self._hang_released = threading.Event()
        self.lost_up_to_generation = 0

    def arm(self, kind: str, status: int | None, count: int, current_generation: int) -> None:
        with self._lock:
            if kind == "raise":
                self._raise_status, self._raise_left = status, count
            elif kind == "hang":
                self._hang_released.clear()
                self._hang_left = count
            else:
                self.lost_up_to_generation = current_generation

    def take(self) -> tuple[str, int | None] | None:
        """The fault the next operation suffers, if any (hangs come first)."""
        with self._lock:
            if self._hang_left:
                self._hang_left -= 1
                return ("hang", None)
            if self._raise_left:
                self._raise_left -= 1
                return ("raise", self._raise_status)
        return None

    def wait_for_release(self) -> None:
        self._hang_released.wait(HANG_LIMIT_S)

    def release_hang(self) -> None:
        with self._lock:
            self._hang_left = 0
        self._hang_released.set()

    def clear(self) -> None:
        with self._lock:
            self._raise_left = self._hang_left = 0
            self.lost_up_to_generation = 0
        self._hang_released.set()


class _MemoryLedger:
    """Device memory and network-group slots, counted per owning VDevice."""

    def __init__(self, capacity_mb: int):
        self._capacity_mb = capacity_mb
        self._lock = threading.Lock()
        self._held: dict[int, tuple[int, int]] = {}  # token -> (owner generation, MB)
        self._next_token = 1

    def reserve(self, owner: int, megabytes: int) -> int | None:
        """A token for the reservation, or None when it does not fit."""
        with self._lock:
            used = sum(mb for _, mb in self._held.values())
            if used + megabytes > self._capacity_mb or len(self._held) >= NETWORK_GROUP_LIMIT:
                return None
            token, self._next_token = self._next_token, self._next_token + 1
            self._held[token] = (owner, megabytes)
            return token

    def release(self, token: int) -> bool:
        with self._lock:
            return self._held.pop(token, None) is not None

    def release_owner(self, owner: int) -> int:
        """Free everything a VDevice still holds; returns how many models that was."""
        with self._lock:
            tokens = [t for t, (o, _) in self._held.items() if o == owner]
            for token in tokens:
                del self._held[token]
            return len(tokens)

    def used_mb(self) -> int:
        with self._lock:
            return sum(mb for _, mb in self._held.values())


class _ExclusiveLock:
    """``flock`` on the lock file: the simulated 'device owned by a process'.

    Each instance opens its own file description, so two VDevices of one
    process conflict too, as two processes would.
    """

    def __init__(self, path: str):
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor drops the flock


class _SimulatedChip:
    """State of the one simulated accelerator, shared by every platform object."""

    def __init__(self, settings):
        self.settings = settings
        # The operation log keeps only the latest entries: a simulated daemon
        # (make run, the soak test) may run for days.
        self.calls: collections.deque[tuple] = collections.deque(maxlen=CALL_LOG_ENTRIES)
        self._calls_lock = threading.Lock()
        self.memory = _MemoryLedger(settings.device_memory_mb)
        self.faults = _FaultPlan()
        self.temperature_c = float(settings.temperature_c)
        self.sleep = time.sleep  # tests may swap in a fake clock
        self.infer_ms_override: int | None = None
        self.hang_ms_override: int | None = None
        self._generation_lock = threading.Lock()
        self._generation = 0
        self.classes: dict[str, type] = {}  # recorded class name -> as this version has it
        self.surface: hailort_api.ApiSurface | None = None  # set by SimulatedModules
        self.active_model = None  # the activated ConfiguredInferModel (no scheduler)

    def raw_status_error(self, number: int) -> HailoRTStatusException:
        """The raw status exception with this version's base class (see HailoRTStatusException)."""
        record = (self.surface.exceptions or {}).get("_pyhailort.HailoRTStatusException", {})
        return raw_status_error(number, str(record.get("base", "")).startswith("_pyhailort.HailoRTException"))

    def record(self, *entry) -> None:
        with self._calls_lock:  # any thread records; tests read it meanwhile
            self.calls.append(entry)

    def call_log(self) -> list[tuple]:
        with self._calls_lock:
            return list(self.calls)

    def next_generation(self) -> int:
        with self._generation_lock:
            self._generation += 1
            return self._generation

    @property
    def generation(self) -> int:
        return self._generation

    def infer_ms(self, frames: int = 1) -> int:
        """How long an inference over ``frames`` bindings takes: ``infer_ms`` per
        frame (no gain is claimed for the chip's pipelining, which we cannot
        measure here), or the request's ``simulate_ms`` for the whole call."""
        override = self.infer_ms_override
        return self.settings.infer_ms * frames if override is None else override

    def sleep_ms(self, milliseconds: float) -> None:
        if milliseconds > 0:  # sleep(0) would still hand the GIL away and wait to get it back
            self.sleep(milliseconds / 1000.0)

    def is_lost(self, generation: int) -> bool:
        return generation <= self.faults.lost_up_to_generation

    def device_operation(self, generation: int | None, *, raw: bool = False) -> None:
        """Gate in front of every operation that reaches the device: faults apply here.

        ``generation`` is the VDevice's (None while creating one); ``raw``
        selects the genai constructors' unwrapped status exception.
        """
        hang_ms, self.hang_ms_override = self.hang_ms_override, None
        if hang_ms:
            self.record("hang", hang_ms)
            self.sleep_ms(hang_ms)
        if generation is not None and self.is_lost(generation):
            raise self.raw_status_error(COMMUNICATION_CLOSED) if raw else status_error(
                COMMUNICATION_CLOSED, "the device was lost (injected fault)")
        fault = self.faults.take()
        if fault is None:
            return
        kind, number = fault
        self.record("fault", kind)
        if kind == "hang":
            self.faults.wait_for_release()
            # The device may have been lost while the call hung.
            if generation is not None and self.is_lost(generation):
                raise self.raw_status_error(COMMUNICATION_CLOSED) if raw else status_error(
                    COMMUNICATION_CLOSED, "the device was lost during the call (injected fault)")
            return
        raise self.raw_status_error(number) if raw else status_error(number, "injected fault")


def _make(chip, name: str, *args):
    """A new object of recorded class ``name`` as this chip's HailoRT version has it."""
    return chip.classes[name](*args)


# ------------------------------------------------------------- model files

@dataclass(frozen=True)
class _StreamSpec:
    name: str
    shape: tuple
    format_type: FormatType


@dataclass(frozen=True)
class _ModelFile:
    """A model file's content: label for logs, identity digest, parsed YAML (or None)."""
    label: str
    digest: bytes
    description: dict | None


def _read_model_file(source, failure) -> _ModelFile:
    """Read a model given as a path (str) or as its bytes.

    ``failure(number, detail)`` builds the exception to raise, so the infer
    model path and the genai constructors fail each in their own style.
    """
    if isinstance(source, bytes):
        content = source
        label = f"<bytes:{hashlib.blake2b(content, digest_size=4).hexdigest()}>"
    elif isinstance(source, str):
        try:
            with open(source, "rb") as handle:
                content = handle.read()
        except OSError as exc:
            # No "from None": that would drop the status chained as __cause__.
            raise failure(OPEN_FILE_FAILURE, f"cannot open {source}: {exc.strerror}")
        label = source
    else:
        # The real binding accepts only str or bytes (pybind raises TypeError).
        raise TypeError(f"model must be a path (str) or bytes, got {type(source).__name__}")
    if not content:
        raise failure(INVALID_HEF, f"{label} is empty")
    digest = hashlib.blake2b(content, digest_size=16).digest()
    return _ModelFile(label, digest, _yaml_mapping(content))


def _yaml_mapping(content: bytes) -> dict | None:
    """The YAML mapping a simulated model file holds, or None (e.g. a real HEF)."""
    if len(content) > YAML_SNIFF_BYTES:
        return None
    try:
        data = yaml.safe_load(content.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _shape(value, what: str) -> tuple:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{what} must be a non-empty list of positive integers, got {value!r}")
    return tuple(_positive_int(v, what) for v in value)


def _memory_mb(description: dict | None, default: int) -> int:
    if description is None or "memory_mb" not in description:
        return default
    value = description["memory_mb"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"memory_mb must be an integer >= 0, got {value!r}")
    return value


def _stream_specs(entries, side: str, default: _StreamSpec) -> tuple:
    if entries is None:
        return (default,)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{side} must be a non-empty list")
    fallback_format = FormatType.UINT8 if side == "inputs" else FormatType.FLOAT32
    specs = []
    for index, entry in enumerate(entries):
        where = f"{side}[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping")
        name = entry.get("name", f"{side[:-1]}_layer{index + 1}")
        format_name = str(entry.get("format", fallback_format.name)).upper()
        if format_name not in ("UINT8", "UINT16", "FLOAT32"):
            raise ValueError(f"{where}.format must be UINT8, UINT16 or FLOAT32")
        specs.append(_StreamSpec(str(name), _shape(entry.get("shape"), f"{where}.shape"),
                                 FormatType[format_name]))
    if len({spec.name for spec in specs}) != len(specs):
        raise ValueError(f"{side} has duplicate names")
    return tuple(specs)


@dataclass(frozen=True)
class _NetworkSpec:
    """What an infer model's file describes."""
    file: _ModelFile
    inputs: tuple
    outputs: tuple
    memory_mb: int
    async_queue_size: int = DEFAULT_ASYNC_QUEUE_SIZE

    @classmethod
    def from_file(cls, file: _ModelFile, settings) -> "_NetworkSpec":
        description = file.description or {}
        default_in = _StreamSpec("input_layer1", tuple(settings.image_shape), FormatType.UINT8)
        default_out = _StreamSpec("output_layer1", (settings.embedding_size,), FormatType.FLOAT32)
        try:
            return cls(file,
                       _stream_specs(description.get("inputs"), "inputs", default_in),
                       _stream_specs(description.get("outputs"), "outputs", default_out),
                       _memory_mb(file.description, settings.model_memory_mb),
                       _positive_int(description.get("async_queue_size", DEFAULT_ASYNC_QUEUE_SIZE),
                                     "async_queue_size"))
        except ValueError as exc:
            raise status_error(INVALID_HEF, f"{file.label}: {exc}")


_SMALL_OUTPUT_ELEMENTS = 4096
_SMALL_FLOAT_OUTPUT_ELEMENTS = 1024


def _normal_from_hash(seed: bytes, count: int) -> np.ndarray:
    """``count`` standard normal float32 values drawn from ``seed``: Box-Muller
    over the hash's bits made into floats in [1, 2) (float32 throughout:
    numpy lets go of the GIL in every cast or copy, however small)."""
    bits = np.frombuffer(hashlib.shake_128(seed).digest(8 * count), dtype="<u4")
    uniform = ((bits >> np.uint32(9)) | np.uint32(0x3F800000)).view(np.float32)   # [1, 2)
    radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(2.0) - uniform[:count]))  # of (0, 1]
    return radius * np.cos(np.float32(2.0 * math.pi) * (uniform[count:] - np.float32(1.0)))


def _output_seed(model_digest: bytes, output_name: str):
    """The hash an output's values start from: the model and the output's
    name (made once per configured model, copied per frame)."""
    hasher = hashlib.blake2b(model_digest, digest_size=16)
    hasher.update(output_name.encode())
    return hasher


def _inputs_key(inputs: list[tuple[str, memoryview]]) -> bytes:
    """A frame's input bytes as hashed into every output: each input's name,
    CRC-32 and length (one pass, several times faster than a cryptographic
    hash over megabytes: the simulated device should cost little, so
    benchmarks see the daemon's own work)."""
    return b"".join(b"\0" + name.encode() + b"\0" + zlib.crc32(data).to_bytes(4, "little")
                    + len(data).to_bytes(8, "little") for name, data in inputs)


def _simulated_output(model_digest: bytes, spec: _StreamSpec, format_type: FormatType,
                      inputs: list[tuple[str, memoryview]]) -> np.ndarray:
    """Deterministic output: seeded by the model, the output's name and the input bytes."""
    return _seeded_output(_output_seed(model_digest, spec.name), spec, format_type, _inputs_key(inputs))


def _seeded_output(seed, spec: _StreamSpec, format_type: FormatType, inputs_key: bytes) -> np.ndarray:
    """:func:`_simulated_output` from its parts (``seed`` is not changed)."""
    hasher = seed.copy()
    hasher.update(inputs_key)
    count = math.prod(spec.shape)
    # A small output comes straight from the hash, with no numpy call that
    # lets go of the GIL: seeding a generator (which also costs more than a
    # small model's whole simulated run), np.linalg.norm, a copy or a cast.
    # Each such call hands the GIL to the event loop's thread, and the device
    # thread then waits for it back.
    if format_type != FormatType.FLOAT32 and count <= _SMALL_OUTPUT_ELEMENTS:
        dtype = _DTYPES[format_type]
        raw = bytearray(hashlib.shake_128(hasher.digest()).digest(count * dtype.itemsize))
        return np.frombuffer(raw, dtype=dtype).reshape(spec.shape)   # writable, as the copy was
    if format_type == FormatType.FLOAT32:
        if count <= _SMALL_FLOAT_OUTPUT_ELEMENTS:
            values = _normal_from_hash(hasher.digest(), count).reshape(spec.shape)
        else:
            rng = np.random.default_rng(int.from_bytes(hasher.digest(), "little"))
            values = rng.standard_normal(spec.shape, dtype=np.float32)
        if len(spec.shape) == 1:  # an embedding: unit length, as CLIP-like models give
            values /= np.float32(math.sqrt(float(np.add.reduce(values * values)))) or np.float32(1.0)
        return values
    rng = np.random.default_rng(int.from_bytes(hasher.digest(), "little"))
    top = 256 if format_type == FormatType.UINT8 else 65536
    return rng.integers(0, top, size=spec.shape, dtype=_DTYPES[format_type])


# ------------------------------------------------------------------ VDevice

class VDeviceParams:
    """``VDevice.create_params()``: HailoRT's defaults."""

    def __init__(self):
        self.device_count = 1
        self.device_ids: list = []
        self._scheduling_algorithm = int(HailoSchedulingAlgorithm.ROUND_ROBIN)
        self.group_id = UNIQUE_GROUP
        self.multi_process_service = False

    @property
    def scheduling_algorithm(self) -> int:
        return self._scheduling_algorithm  # the real getter returns a plain int

    @scheduling_algorithm.setter
    def scheduling_algorithm(self, value) -> None:
        self._scheduling_algorithm = int(HailoSchedulingAlgorithm(value))


class VDevice:
    """The simulated VDevice. ``_chip`` is bound per backend (see SimulatedModules)."""

    _chip: _SimulatedChip

    def __init__(self, params=None, *, device_ids=None):
        self._released = True  # so __del__ is safe if opening fails
        self._lock: _ExclusiveLock | None = None
        self._creation_pid = os.getpid()
        self._params = params if params is not None else VDevice.create_params()
        self.generation = 0
        self._check_params(device_ids)
        self._chip.device_operation(None)
        self._take_lock()
        self.generation = self._chip.next_generation()
        self._released = False
        self._chip.record("vdevice_open", self._params.group_id)

    @staticmethod
    def create_params() -> VDeviceParams:
        return VDeviceParams()

    def _check_params(self, device_ids) -> None:
        params = self._params
        ids = list(device_ids if device_ids is not None else params.device_ids or [])
        if params.multi_process_service:
            raise status_error(INVALID_OPERATION, "multi_process_service is not supported on Hailo-10H")
        if params.device_count != 1 or len(ids) > 1:
            raise status_error(OUT_OF_PHYSICAL_DEVICES, "the simulated system has one device")
        unknown = [i for i in ids if i != DEVICE_ID]
        if unknown:  # uncertain: the exact number HailoRT gives for an unknown id
            raise status_error(NOT_FOUND, f"no device {unknown[0]!r} (have {DEVICE_ID})")

    def _take_lock(self) -> None:
        if self._params.group_id != UNIQUE_GROUP:
            return  # a shared group: other processes may join, no lock
        path = self._chip.settings.lock_path
        try:
            self._lock = _ExclusiveLock(path)
        except BlockingIOError:
            raise status_error(OUT_OF_PHYSICAL_DEVICES, f"{path} is locked")
        except OSError as exc:  # like a device node we may not open (13, then 36)
            raise status_error(DRIVER_OPERATION_FAILED, f"cannot open {path}: {exc.strerror}")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()
        return False

    def __del__(self):
        with contextlib.suppress(Exception):  # as pyhailort does; never fail in GC
            self.release()

    def release(self) -> None:
        """Give back the device and every model's memory; safe to call twice."""
        if self._released:
            return
        self._released = True
        live_models = self._chip.memory.release_owner(self.generation)
        # live_models > 0 tells tests the daemon released the VDevice before its models.
        self._chip.record("vdevice_release", live_models)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _ensure_usable(self) -> None:
        if self._released:
            raise status_error(INVALID_OPERATION, "the VDevice was released")

    def get_physical_devices_ids(self) -> list:
        self._ensure_usable()
        return [DEVICE_ID]

    def get_physical_devices(self) -> list:
        return [_make(self._chip, "Device", device_id) for device_id in self.get_physical_devices_ids()]

    def create_infer_model(self, hef_source, name=""):
        if os.getpid() != self._creation_pid:
            raise HailoRTException("InferModel can be created only from the process VDevice was created in.")
        self._ensure_usable()
        file = _read_model_file(hef_source, status_error)
        spec = _NetworkSpec.from_file(file, self._chip.settings)
        self._chip.record("create_infer_model", file.label)
        return _make(self._chip, "InferModel", self, spec, name)


# -------------------------------------------------------------- infer models

@dataclass(frozen=True)
class _Format:
    type: FormatType


class InferStream:
    """An input or output of an InferModel: name, shape (HWC list), format."""

    def __init__(self, spec: _StreamSpec):
        self._spec = spec
        self._format_type = spec.format_type

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def shape(self) -> list:
        return list(self._spec.shape)

    @property
    def format(self) -> _Format:
        return _Format(self._format_type)

    @property
    def is_nms(self) -> bool:
        return False

    def set_format_type(self, type) -> None:  # noqa: A002 - HailoRT's keyword name
        try:
            chosen = FormatType(type)
        except ValueError:
            raise status_error(INVALID_ARGUMENT, f"unknown format type {type!r}")
        # AUTO means "as the HEF has it".
        self._format_type = self._spec.format_type if chosen == FormatType.AUTO else chosen


def _pick(streams: dict, name, kind: str):
    """A stream by name; the empty name picks the only one (HailoRT's rule)."""
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a str, got {type(name).__name__}")
    if name == "" and len(streams) == 1:
        return next(iter(streams.values()))
    if name in streams:
        return streams[name]
    wanted = "a name (several exist)" if name == "" else repr(name)
    raise status_error(NOT_FOUND, f"no {kind} stream {wanted}; {kind}s: {', '.join(streams)}")


class InferModel:
    """What ``VDevice.create_infer_model`` returns; ``configure()`` loads it."""

    def __init__(self, vdevice: VDevice, spec: _NetworkSpec, name: str):
        self._vdevice = vdevice
        self._spec = spec
        self._name = name
        chip = vdevice._chip
        self._inputs = {s.name: _make(chip, "InferModel.InferStream", s) for s in spec.inputs}
        self._outputs = {s.name: _make(chip, "InferModel.InferStream", s) for s in spec.outputs}
        self._batch_size = 0  # HAILO_DEFAULT_BATCH_SIZE: chosen by HailoRT

    @property
    def input_names(self) -> list:
        return list(self._inputs)

    @property
    def output_names(self) -> list:
        return list(self._outputs)

    @property
    def inputs(self) -> list:
        return list(self._inputs.values())

    @property
    def outputs(self) -> list:
        return list(self._outputs.values())

    def input(self, name=""):
        return _pick(self._inputs, name, "input")

    def output(self, name=""):
        return _pick(self._outputs, name, "output")

    def set_batch_size(self, batch_size) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise status_error(INVALID_ARGUMENT, f"batch size must be an integer >= 0, got {batch_size!r}")
        self._batch_size = batch_size

    def configure(self):
        """Load the network: sleeps load_ms, reserves memory (plain 81 if it does not fit)."""
        vdevice, chip = self._vdevice, self._vdevice._chip
        vdevice._ensure_usable()
        chip.device_operation(vdevice.generation)
        token = chip.memory.reserve(vdevice.generation, self._spec.memory_mb)
        if token is None:
            raise status_error(RESOURCE_EXHAUSTED,
                               f"{self._spec.file.label} needs {self._spec.memory_mb} MB")
        chip.sleep_ms(chip.settings.load_ms)
        chip.record("configure", self._spec.file.label)
        formats = {s.name: s._format_type for s in (*self._inputs.values(), *self._outputs.values())}
        return _make(chip, "ConfiguredInferModel", vdevice, self._spec, formats, token)


class _BoundStream:
    """One buffer of a Bindings: what ``bindings.input(name)`` returns."""

    def __init__(self, spec: _StreamSpec, format_type: FormatType):
        self.spec = spec
        self.format_type = format_type
        self.dtype = _DTYPES[format_type]
        self.expected_bytes = math.prod(spec.shape) * self.dtype.itemsize
        self._buffer: np.ndarray | None = None  # the caller's
        self._result: np.ndarray | None = None  # allocated here when the caller set none

    def set_buffer(self, buffer) -> None:
        # pyhailort checks contiguity only (P:2777); the byte size is checked
        # when the bindings are submitted (_check_size), as libhailort does.
        if not isinstance(buffer, np.ndarray):
            raise TypeError(f"{self.spec.name}: buffer must be a numpy array")
        if not buffer.flags.c_contiguous:
            raise HailoRTException("Buffer must be C_CONTIGUOUS")  # pyhailort's own check: no status
        self._buffer = buffer
        self._result = None

    def _check_size(self, side: str) -> None:
        """libhailort's submit-time check (infer_model.cpp:961-962, v5.2.0): bytes, not dtype."""
        expected = self.expected_bytes
        if self._buffer is None:
            if side == "Input":  # uncertain: the number HailoRT reports for a missing input buffer
                raise status_error(INVALID_OPERATION, f"input {self.spec.name!r} has no buffer")
            return
        if self._buffer.nbytes != expected:
            raise status_error(INVALID_OPERATION, f"{side} buffer size {self._buffer.nbytes} is different than "
                                                  f"expected {expected} for {side.lower()} '{self.spec.name}'")

    def get_buffer(self, tf_format=False):
        # Departure (the brief asks for it): real pyhailort returns only what
        # set_buffer stored (None otherwise, and run would fail); here an
        # output nobody set gets a new array per run. Handlers should still
        # set output buffers.
        return self._buffer if self._buffer is not None else self._result

    def _input_bytes(self) -> memoryview:
        """The caller's buffer as bytes, without a copy (checked by _check_size first)."""
        return memoryview(self._buffer).cast("B")

    def _deliver(self, result: np.ndarray) -> None:
        if self._buffer is None:
            self._result = result
        else:  # bytes, as the device writes them
            memoryview(self._buffer).cast("B")[:] = memoryview(np.ascontiguousarray(result)).cast("B")


class Bindings:
    """The buffers of one frame: ``input(name)`` / ``output(name)``."""

    def __init__(self, owner, inputs: dict, outputs: dict):
        self._owner = owner
        self._inputs = inputs
        self._outputs = outputs

    def input(self, name=""):
        return _pick(self._inputs, name, "input")

    def output(self, name=""):
        return _pick(self._outputs, name, "output")

    def _check_sizes(self) -> None:
        for stream in self._inputs.values():
            stream._check_size("Input")
        for stream in self._outputs.values():
            stream._check_size("Output")


class AsyncInferCompletionInfo:
    """What a run_async callback receives as ``completion_info``."""

    def __init__(self, exception=None):
        self.exception = exception


# Inferences in flight complete here after their simulated duration (a few at
# once, as in a device's async queue), never on a new thread per inference.
_COMPLETIONS = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="hailo-sim-infer")


class AsyncInferJob:
    """A running inference: results land after the simulated duration.

    Whether ``wait(timeout_ms)`` times out is decided from the simulated
    duration, not the wall clock, so tests with a fake sleep stay exact.
    """

    def __init__(self, chip: _SimulatedChip, duration_ms: int, finish):
        self._chip = chip
        self._duration_ms = duration_ms
        if duration_ms <= 0:
            self._done = None
            finish()  # nothing to wait for: no thread hop, no event
        else:
            self._done = threading.Event()
            _COMPLETIONS.submit(self._complete, finish)

    def _complete(self, finish) -> None:
        try:
            self._chip.sleep_ms(self._duration_ms)
            finish()
        finally:
            self._done.set()

    def wait(self, timeout_ms) -> None:
        if self._duration_ms > timeout_ms:
            self._chip.sleep_ms(timeout_ms)
            raise status_error(TIMEOUT, f"inference takes {self._duration_ms} ms, timeout {timeout_ms} ms")
        if self._done is not None:
            self._done.wait()


class ConfiguredInferModel:
    """A loaded network: bindings, run / run_async; shutdown or exit frees its memory.

    As libhailort (infer_model.cpp, async_infer_runner.cpp; docs/hailort-api.md):
    a run over N bindings submits them one by one into a queue of
    ``get_async_queue_size()``; a submit that fails (queue full: 82, a buffer
    of the wrong byte size: 6) shuts the model down, and every later call
    fails with 63 HAILO_STREAM_ABORT. Without a scheduler the model must be
    ``activate()``d (72 otherwise), and only one model may be active.
    """

    def __init__(self, vdevice: VDevice, spec: _NetworkSpec, formats: dict, token: int):
        self._vdevice = vdevice
        self._chip = vdevice._chip
        self._spec = spec
        self._formats = formats  # format types as set when configure() ran
        self._token: int | None = token
        self._aborted = False    # shut down by a failed submit: unrecoverable
        # Per output, what its simulated values start from (see _outputs_for).
        self._output_seeds = [(stream, formats[stream.name], _output_seed(spec.file.digest, stream.name))
                              for stream in spec.outputs]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self._free()
        return False

    def shutdown(self) -> None:
        self._free()

    def _free(self) -> None:
        self._aborted = True
        if self._chip.active_model is self:
            self._chip.active_model = None
        if self._token is None:
            return
        token, self._token = self._token, None
        if self._chip.memory.release(token):
            self._chip.record("release", self._spec.file.label)

    def _ensure_usable(self) -> None:
        self._vdevice._ensure_usable()
        if self._aborted:
            raise status_error(STREAM_ABORT)

    def _scheduler_on(self) -> bool:
        return self._vdevice._params.scheduling_algorithm != HailoSchedulingAlgorithm.NONE

    def activate(self) -> None:
        self._ensure_usable()
        if self._scheduler_on():
            raise status_error(INVALID_OPERATION, "Manually activate a core-op is not allowed when the "
                                                  "core-op scheduler is active!")
        if self._chip.active_model not in (None, self):
            raise status_error(INVALID_OPERATION, "Cant activate network because a network is already activated")
        self._chip.active_model = self

    def deactivate(self) -> None:
        if self._chip.active_model is self:
            self._chip.active_model = None

    def get_async_queue_size(self) -> int:
        self._ensure_usable()
        return self._spec.async_queue_size

    def create_bindings(self, input_buffers=None, output_buffers=None) -> Bindings:
        self._ensure_usable()
        classes, formats = self._chip.classes, self._formats   # as _make picks them, once per frame
        stream = classes["ConfiguredInferModel.Bindings.InferStream"]
        bindings = classes["ConfiguredInferModel.Bindings"](
            self, {s.name: stream(s, formats[s.name]) for s in self._spec.inputs},
            {s.name: stream(s, formats[s.name]) for s in self._spec.outputs})
        for name, buffer in (input_buffers or {}).items():
            bindings.input(name).set_buffer(buffer)
        for name, buffer in (output_buffers or {}).items():
            bindings.output(name).set_buffer(buffer)
        return bindings

    def wait_for_async_ready(self, timeout_ms=1000, frames_count=1) -> None:
        self._ensure_usable()
        # Nothing stays queued between calls here: only more than the queue holds waits (forever).
        if frames_count > self._spec.async_queue_size:
            self._chip.sleep_ms(timeout_ms)
            raise status_error(TIMEOUT, f"wait_for_async_ready: {frames_count} frames, queue of "
                                        f"{self._spec.async_queue_size}")

    def run(self, bindings, timeout) -> None:
        """Synchronous inference (``run_async`` then ``wait``); ``timeout`` in ms."""
        self.run_async(bindings).wait(timeout)

    def run_async(self, bindings, callback=None) -> AsyncInferJob:
        """One inference over a list of Bindings (a batch): ``infer_ms`` per frame."""
        self._ensure_usable()
        frames = self._checked_bindings(bindings)
        self._submit_checks(frames)
        self._chip.device_operation(self._vdevice.generation)
        results = [(frame, self._outputs_for(frame)) for frame in frames]
        self._chip.record("run", self._spec.file.label)

        def finish():
            for frame, outputs in results:
                for name, array in outputs.items():
                    frame._outputs[name]._deliver(array)
            if callback is not None:
                callback(completion_info=AsyncInferCompletionInfo(None))

        return _make(self._chip, "AsyncInferJob", self._chip, self._chip.infer_ms(len(frames)), finish)

    def _submit_checks(self, frames: list) -> None:
        """What libhailort checks per submitted binding; a failure shuts the model down."""
        try:
            if not self._scheduler_on() and self._chip.active_model is not self:
                raise status_error(STREAM_NOT_ACTIVATED)
            for frame in frames[:self._spec.async_queue_size]:
                frame._check_sizes()
            if len(frames) > self._spec.async_queue_size:
                raise status_error(QUEUE_IS_FULL)
        except HailoRTException:
            self.shutdown()
            raise

    def _checked_bindings(self, bindings) -> list:
        if not isinstance(bindings, (list, tuple)):
            # pyhailort iterates the argument: a bare Bindings is a TypeError there too.
            raise TypeError("bindings must be a list of Bindings")
        if not bindings or any(getattr(b, "_owner", None) is not self for b in bindings):
            raise status_error(INVALID_ARGUMENT, "bindings must come from this model's create_bindings()")
        return list(bindings)

    def _outputs_for(self, frame: Bindings) -> dict:
        """Each output's values, as :func:`_simulated_output` makes them (the
        frame's inputs hashed once for all its outputs)."""
        key = _inputs_key([(s.name, frame._inputs[s.name]._input_bytes()) for s in self._spec.inputs])
        return {stream.name: _seeded_output(seed, stream, format_type, key)
                for stream, format_type, seed in self._output_seeds}


# -------------------------------------------------------------------- genai

def _check_prompt(prompt):
    """pyhailort's own prompt checks (plain HailoRTException, no status)."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        raise HailoRTException("prompt must be a list of dicts in chat format")
    if not all(isinstance(item, dict) for item in prompt):
        raise HailoRTException("prompt must be a list of dicts")
    return prompt


def _check_sampling(temperature, top_p, top_k, frequency_penalty) -> None:
    """The generator's checks when a generation starts (hailort genai llm.cpp:553-565, v5.2.0)."""
    problems = [text for bad, text in (
        (temperature is not None and not temperature > 0, f"temperature must be > 0, got {temperature}"),
        (top_p is not None and not 0 <= top_p <= 1, f"top_p must be in [0, 1], got {top_p}"),
        (top_k is not None and not top_k >= 1, f"top_k must be >= 1, got {top_k}"),
        (frequency_penalty is not None and frequency_penalty == 0, "frequency_penalty must not be 0"),
    ) if bad]
    if problems:
        raise status_error(INVALID_ARGUMENT, "; ".join(problems))


def _prompt_text(prompt) -> str:
    """The text the answer echoes: a str prompt, or the last message's text parts."""
    if isinstance(prompt, str):
        return prompt
    content = prompt[-1].get("content", "") if prompt else ""
    if isinstance(content, str):
        return content
    return " ".join(str(part.get("text", "")) for part in content
                    if isinstance(part, dict) and part.get("type") == "text")


def _image_slots(prompt) -> int | None:
    """Image slots of a chat prompt; None for a raw str prompt (not checked)."""
    if isinstance(prompt, str):
        return None
    return sum(1 for message in prompt for part in message.get("content", [])
               if isinstance(part, dict) and part.get("type") == "image")


class LLMGeneratorCompletion:
    """A streaming generation: iterate for str tokens; ``read``, ``read_all``, ``release``.

    Tokens are made one at a time as they are read (``_GenAIModel._tokens``),
    each read costing its time, so a generation that is released (leaving the
    ``with`` block) makes no further token and costs no further time: as on
    the device, where releasing a completion that is still GENERATING aborts
    it (llm.cpp:714-727, v5.2.0). The status comes with each token, as the
    server sends it (llm.cpp:905-908; llm_server.cpp:958-968): the token that
    reaches ``max_generated_tokens`` ends with MAX_TOKENS_REACHED, one that
    completes a stop sequence with LOGICAL_END_OF_GENERATION.
    """

    def __init__(self, model, tokens, max_generated_tokens: int, stop_sequences: list,
                 first_ms: float, token_ms: float):
        self._model = model
        self._source = iter(tokens)
        self._max = max_generated_tokens
        self._stops = [list(sequence) for sequence in stop_sequences if sequence]
        self._recent: list = []   # word ids of the tokens so far, for stop matching
        self._count = 0
        self._first_ms = first_ms
        self._token_ms = token_ms
        self._status = LLMGeneratorCompletionStatus.GENERATING
        self._released = False

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()
        return False

    def release(self) -> None:
        if not self._released:
            self._released = True
            if self._status == LLMGeneratorCompletionStatus.GENERATING:
                self._status = LLMGeneratorCompletionStatus.ABORTED
                self._model._chip.record(f"{self._model._kind}_abort", self._model._file.label, self._count)
                self._model._generation_ended(self._count)
        self._model._completion_finished(self)

    @property
    def generation_status(self):
        return self._status

    def read(self, timeout_ms=10000) -> str:
        self._ensure_not_released()
        if self._status != LLMGeneratorCompletionStatus.GENERATING:
            # llm.cpp:889-890 (v5.2.0): "read() cannot be called after generation completed!"
            raise status_error(INVALID_OPERATION, "read() cannot be called after generation completed!")
        self._spend(self._next_cost(), timeout_ms)
        return self._next_token()

    def read_all(self, timeout_ms=10000) -> str:
        """Every token left, within one budget (llm.cpp:914-923)."""
        self._ensure_not_released()
        budget, text = float(timeout_ms), []
        while self._status == LLMGeneratorCompletionStatus.GENERATING:
            cost = self._next_cost()
            self._spend(cost, budget)
            budget -= cost
            text.append(self._next_token())
        return "".join(text)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        # PY:4102-4105 (v5.2.0): StopIteration once the status is no longer GENERATING.
        if self.generation_status != LLMGeneratorCompletionStatus.GENERATING:
            raise StopIteration("Generation complete")
        return self.read()

    def _next_cost(self) -> float:
        return self._token_ms + (self._first_ms if self._count == 0 else 0.0)

    def _next_token(self) -> str:
        token = next(self._source)
        self._count += 1
        self._recent.extend(self._model._word_ids(token))
        if self._count >= self._max:
            self._status = LLMGeneratorCompletionStatus.MAX_TOKENS_REACHED
        elif any(self._recent[-len(stop):] == stop for stop in self._stops if len(stop) <= len(self._recent)):
            self._status = LLMGeneratorCompletionStatus.LOGICAL_END_OF_GENERATION
        if self._status != LLMGeneratorCompletionStatus.GENERATING:
            self._model._generation_ended(self._count)
        return token

    def _ensure_not_released(self) -> None:
        if self._released:
            raise status_error(INVALID_OPERATION, "the completion was released")

    def _spend(self, milliseconds: float, timeout_ms) -> None:
        chip = self._model._chip
        if milliseconds > timeout_ms:
            chip.sleep_ms(timeout_ms)
            raise status_error(TIMEOUT, f"the next token needs {milliseconds:.0f} ms, timeout {timeout_ms} ms")
        chip.sleep_ms(milliseconds)


class _GenAIBase:
    """What every genai model shares: loading (a raw status on failure), release."""

    _kind = "genai"

    def __init__(self, vdevice, model_path):
        if not isinstance(vdevice, VDevice):
            raise TypeError("vdevice must be a VDevice")
        if vdevice._released:  # uncertain: the real binding fails in its own way here
            raise vdevice._chip.raw_status_error(INVALID_OPERATION)
        self._check_path_for_server(model_path, vdevice._chip)
        self._vdevice = vdevice
        self._chip = chip = vdevice._chip
        chip.device_operation(vdevice.generation, raw=True)
        self._file = _read_model_file(model_path, lambda number, _detail: chip.raw_status_error(number))
        try:
            self._memory_mb = _memory_mb(self._file.description, chip.settings.model_memory_mb)
            self._configure_from(self._file.description or {})
        except ValueError:
            raise chip.raw_status_error(INVALID_HEF) from None
        self._token = chip.memory.reserve(vdevice.generation, self._memory_mb)
        if self._token is None:
            raise chip.raw_status_error(RESOURCE_EXHAUSTED)
        chip.sleep_ms(chip.settings.load_ms)
        chip.record(f"{self._kind}_load", self._file.label)

    def _configure_from(self, description: dict) -> None:
        """Read the model's own keys of a YAML description (ValueError if malformed)."""

    def _check_path_for_server(self, model_path, chip) -> None:
        """Speech2Text reads the file on the host (speech2text.cpp:152, v5.2.0): any path works."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()
        return False

    def release(self) -> None:
        token, self._token = self._token, None
        if token is not None and self._chip.memory.release(token):
            self._chip.record("release", self._file.label)

    def _ensure_usable(self) -> None:
        self._vdevice._ensure_usable()
        if self._token is None:
            raise status_error(INVALID_OPERATION, f"{self._file.label} was released")


class _ServerPathMixin:
    """For genai models whose constructor sends the HEF path to the chip."""

    def _check_path_for_server(self, model_path, chip) -> None:
        """VLM and LLM send the path *string* to the chip's server, which stats and hashes
        it in its own file system first (llm.cpp:185-201, vlm.cpp:78-92, hailort_server
        genai/utils.hpp:52-78, v5.2.0). There ``/proc/self/fd/N`` names the server's own
        descriptor N, not our file: we fail it as the hash of an unrelated file would
        (uncertain which status; 26 INVALID_HEF here)."""
        if str(model_path).startswith("/proc/self/fd/"):
            chip.record("server_saw_fd_path", str(model_path))
            raise chip.raw_status_error(INVALID_HEF)


class _GenAIModel(_ServerPathMixin, _GenAIBase):
    """What LLM and VLM share: generation and context.

    The answer is made of words: "Simulated LLM answer <digest>:" and up to
    ECHO_WORDS words of the prompt's last text, then the model's end token
    ``END_TOKEN``; past it (when ``set_stop_tokens`` took the end token away)
    the model rambles on with FILLER_WORDS until ``max_generated_tokens``
    (the request's, else the model's default: ``max_generated_tokens`` in its
    YAML, DEFAULT_MAX_GENERATED_TOKENS). Stop tokens are matched on word ids
    (``tokenize``), as the server matches token sequences (llm_server.cpp:821-852).

    Time: an LLM takes ``infer_ms`` for the prompt and ``token_ms`` per
    token (``simulated.token_ms``, or ``token_ms`` in the model's YAML); a
    VLM spreads ``infer_ms`` over its answer's tokens unless its YAML sets
    ``token_ms``; ``simulate_ms`` (request_scope) is spread over the answer.
    """

    def __init__(self, vdevice, model_path):
        self._context_used = 0
        # The model's built-in end token (the server reads stop_token_id from
        # the model's config, llm_server.cpp:118-122, v5.2.0).
        self._stop_tokens: list = [END_TOKEN]
        self._active: LLMGeneratorCompletion | None = None
        super().__init__(vdevice, model_path)

    def _configure_from(self, description: dict) -> None:
        capacity = description.get("context_capacity", DEFAULT_CONTEXT_CAPACITY)
        self._context_capacity = _positive_int(capacity, "context_capacity")
        maximum = description.get("max_generated_tokens", DEFAULT_MAX_GENERATED_TOKENS)
        self._default_max_tokens = _positive_int(maximum, "max_generated_tokens")
        token_ms = description.get("token_ms")
        if token_ms is not None and (isinstance(token_ms, bool) or not isinstance(token_ms, (int, float))
                                     or not 0 <= token_ms <= 600_000):
            raise ValueError(f"token_ms must be a number of milliseconds, got {token_ms!r}")
        self._token_ms = token_ms

    def _start(self, prompt, frames, seed, max_generated_tokens) -> LLMGeneratorCompletion:
        """Begin a generation (a device operation); tokens come from a digest of the inputs."""
        self._ensure_usable()
        running = self._active is not None and (
            self._active.generation_status == LLMGeneratorCompletionStatus.GENERATING)
        if running:  # uncertain: HailoRT's answer to overlapping generations
            raise status_error(INVALID_OPERATION, "a generation is still running; release it first")
        self._chip.device_operation(self._vdevice.generation)
        answer = self._answer(prompt, frames, seed)
        # Uncertain what HailoRT does with a full context; we just stop counting.
        self._context_used = min(self._context_used + len(_prompt_text(prompt).split()), self._context_capacity)
        self._chip.record(f"{self._kind}_generate", self._file.label)
        first_ms, token_ms = self._pace(len(answer))
        self._active = _make(self._chip, "LLMGeneratorCompletion", self, self._tokens(answer),
                             max_generated_tokens or self._default_max_tokens,
                             [self._word_ids(stop) for stop in self._stop_tokens], first_ms, token_ms)
        return self._active

    def _pace(self, answer_tokens: int) -> tuple[float, float]:
        """(ms before the first token, ms per token) for an answer of this many tokens."""
        chip = self._chip
        if chip.infer_ms_override is not None:
            return 0.0, chip.infer_ms_override / answer_tokens
        token_ms = self._token_ms
        if token_ms is None and self._kind == "llm":
            token_ms = chip.settings.token_ms
        if token_ms is None:
            return 0.0, chip.infer_ms() / answer_tokens
        return float(chip.infer_ms()), float(token_ms)

    def _completion_finished(self, completion) -> None:
        if self._active is completion:
            self._active = None

    def _generation_ended(self, generated: int) -> None:
        """The generated tokens stay in the context (until clear_context)."""
        self._context_used = min(self._context_used + generated, self._context_capacity)

    def _answer(self, prompt, frames, seed) -> list:
        hasher = hashlib.blake2b(self._file.digest, digest_size=16)
        hasher.update(json.dumps(prompt, sort_keys=True, default=str).encode())
        for frame in frames:
            hasher.update(frame.tobytes())
        hasher.update(repr(seed).encode())
        words = ["Simulated", self._kind.upper(), "answer", f"{hasher.hexdigest()[:8]}:",
                 *_prompt_text(prompt).split()[:ECHO_WORDS]]
        return [word + " " for word in words[:-1]] + [words[-1], END_TOKEN]

    @staticmethod
    def _tokens(answer: list):
        yield from answer
        for number in itertools.count():
            yield FILLER_WORDS[number % len(FILLER_WORDS)]

    @staticmethod
    def _word_ids(text) -> list:
        return [int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % 151936
                for word in str(text).split()]

    def tokenize(self, text) -> list:
        self._ensure_usable()
        return self._word_ids(text)

    def clear_context(self) -> None:
        self._ensure_usable()
        self._context_used = 0

    def get_context_usage_size(self) -> int:
        self._ensure_usable()
        return self._context_used

    def max_context_capacity(self) -> int:
        self._ensure_usable()
        return self._context_capacity

    def prompt_template(self) -> str:
        return "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"

    def set_stop_tokens(self, stop_tokens) -> None:
        """Replaces every stop token, the built-in end token too (llm.hpp:532; llm_server.cpp:712-713,
        v5.2.0); a string that tokenizes to nothing is dropped (llm.cpp:474-479)."""
        self._ensure_usable()
        if not isinstance(stop_tokens, list) or not all(isinstance(stop, str) for stop in stop_tokens):
            raise TypeError("set_stop_tokens(): incompatible function arguments: stop_tokens must be a list of str")
        self._stop_tokens = [stop for stop in stop_tokens if self._word_ids(stop)]

    def get_stop_tokens(self) -> list:
        self._ensure_usable()
        return list(self._stop_tokens)

    def save_context(self) -> bytes:
        self._ensure_usable()
        return json.dumps({"model": self._file.digest.hex(), "used": self._context_used}).encode()

    def load_context(self, context_data) -> None:
        self._ensure_usable()
        try:
            saved = json.loads(bytes(context_data))
            if saved["model"] != self._file.digest.hex():
                raise ValueError("context of another model")
            self._context_used = int(saved["used"])
        except (ValueError, KeyError, TypeError) as exc:
            raise status_error(INVALID_ARGUMENT, f"cannot load context: {exc}")


class VLM(_GenAIModel):
    """``genai.VLM(vdevice, model_path, optimize_memory_on_device=False)``.

    Takes the union of the recorded versions' parameters; the recorded
    layer (recorded.py) removes ``videos`` (third positional from 5.2) and
    ``timeout_ms`` where a version lacks them, so a positional call that
    works on one version binds as it would on the other.
    """

    _kind = "vlm"

    def __init__(self, vdevice, model_path, optimize_memory_on_device=False):
        super().__init__(vdevice, model_path)

    def _configure_from(self, description: dict) -> None:
        super()._configure_from(description)
        shape = description.get("frame_shape", self._chip.settings.vlm_frame_shape)
        self._frame_shape = _shape(shape, "frame_shape")

    def input_frame_shape(self) -> list:
        return list(self._frame_shape)

    def input_frame_format_type(self):
        return np.dtype(np.uint8)

    def input_frame_size(self) -> int:
        return int(np.prod(self._frame_shape))

    def generate(self, prompt, frames, videos=None, temperature=None, top_p=None, top_k=None,
                 frequency_penalty=None, max_generated_tokens=None, do_sample=None, seed=None):
        prompt = _check_prompt(prompt)
        self._check_frames(prompt, frames, videos)
        _check_sampling(temperature, top_p, top_k, frequency_penalty)
        return self._start(prompt, frames, seed, max_generated_tokens)

    def generate_all(self, prompt, frames, videos=None, temperature=None, top_p=None, top_k=None,
                     frequency_penalty=None, max_generated_tokens=None, do_sample=None, seed=None,
                     timeout_ms=600000) -> str:
        # Internal calls by name: the recorded layer gates only what callers see.
        with VLM.generate(self, prompt, frames, videos, temperature, top_p, top_k, frequency_penalty,
                          max_generated_tokens, do_sample, seed) as completion:
            return completion.read_all(timeout_ms)

    def _check_frames(self, prompt, frames, videos=None) -> None:
        # The first two texts are pyhailort's own Python checks (no status);
        # shape and dtype are checked by the binding (uncertain: which number).
        if not isinstance(frames, list):
            raise HailoRTException("frames must be a list of numpy arrays")
        if videos is not None and not (isinstance(videos, list) and all(
                isinstance(video, list) and all(isinstance(f, np.ndarray) for f in video) for video in videos)):
            raise HailoRTException("videos must be a list of lists of numpy arrays")  # PY:4664 (5.2.0)
        if not all(isinstance(frame, np.ndarray) for frame in frames):
            raise HailoRTException("each frame must be a numpy array")
        # The chip's server compares only byte sizes (hailort vlm_server.cpp,
        # v5.1.1: 250-255); we also demand shape and dtype, so a handler that
        # skipped its own check fails here too. 5.1.1 takes at most 5 frames.
        limit = self._chip.surface.limits.get("vlm_max_frames")
        if limit is not None and len(frames) > limit:
            raise status_error(INVALID_ARGUMENT, f"{len(frames)} frames, at most {limit} in one generation")
        for index, frame in enumerate(frames):
            if tuple(frame.shape) != self._frame_shape or frame.dtype != np.uint8:
                raise status_error(INVALID_ARGUMENT,
                                   f"frame {index} is {list(frame.shape)} {frame.dtype}, "
                                   f"expected {list(self._frame_shape)} uint8")
        slots = _image_slots(prompt)
        if slots is not None and slots != len(frames):
            raise status_error(INVALID_ARGUMENT, f"prompt has {slots} image slots but {len(frames)} frames")


class LLM(_GenAIModel):
    """``genai.LLM(vdevice, model_path, lora_name="", optimize_memory_on_device=False)``."""

    _kind = "llm"

    def __init__(self, vdevice, model_path, lora_name="", optimize_memory_on_device=False):
        self.lora_name = lora_name
        super().__init__(vdevice, model_path)

    def generate(self, prompt, tools=None, temperature=None, top_p=None, top_k=None, frequency_penalty=None,
                 max_generated_tokens=None, do_sample=None, seed=None):
        prompt = _check_prompt(prompt)
        _check_sampling(temperature, top_p, top_k, frequency_penalty)
        return self._start(prompt, [], seed, max_generated_tokens)

    def generate_all(self, prompt, tools=None, temperature=None, top_p=None, top_k=None, frequency_penalty=None,
                     max_generated_tokens=None, do_sample=None, seed=None, timeout_ms=600000) -> str:
        with LLM.generate(self, prompt, tools, temperature, top_p, top_k, frequency_penalty,
                          max_generated_tokens, do_sample, seed) as completion:
            return completion.read_all(timeout_ms)


class Speech2TextTask(enum.IntEnum):
    # Names from HAILORT.md; the numbers are a guess (uncertain). Compare names.
    TRANSCRIBE = 0
    TRANSLATE = 1


@dataclass(frozen=True)
class Speech2TextSegment:
    """One transcribed stretch of audio, as ``generate_all_segments`` returns it."""
    start_sec: float
    end_sec: float
    text: str


class Speech2Text(_GenAIBase):
    """``genai.Speech2Text(vdevice, model_path)`` (HailoRT 5.1+, Hailo-10H).

    Audio: float32 PCM, mono, 16 kHz, one-dimensional numpy array. The
    simulated transcript has one segment per started ``SPEECH_SEGMENT_S``
    seconds of audio; each text is derived from the model file, the task,
    the language and that stretch's samples. The whole call takes
    ``infer_ms``. Uncertain: how the real binding reports malformed audio
    (here status 2, INVALID_ARGUMENT) and whether ``language=None``
    auto-detects on 5.1 (HAILORT.md: 5.1.1 defaults to "en", 5.2 detects).
    """

    _kind = "speech2text"

    def generate_all_segments(self, audio_data, task=Speech2TextTask.TRANSCRIBE, language=None,
                              repetition_penalty=1.0, timeout_ms=10000) -> list:
        self._ensure_usable()
        self._check_call(audio_data, task, language)
        self._chip.device_operation(self._vdevice.generation)
        self._chip.record(f"{self._kind}_generate", self._file.label)
        duration_ms = self._chip.infer_ms()
        if duration_ms > timeout_ms:
            self._chip.sleep_ms(timeout_ms)
            raise status_error(TIMEOUT, f"transcription needs {duration_ms} ms, timeout {timeout_ms} ms")
        self._chip.sleep_ms(duration_ms)
        return self._segments(audio_data, Speech2TextTask(task), language)

    def generate_all_text(self, audio_data, task=Speech2TextTask.TRANSCRIBE, language=None,
                          repetition_penalty=1.0, timeout_ms=10000) -> str:
        segments = self.generate_all_segments(audio_data, task=task, language=language,
                                              repetition_penalty=repetition_penalty,
                                              timeout_ms=timeout_ms)
        return "".join(segment.text for segment in segments)

    @staticmethod
    def _check_call(audio_data, task, language) -> None:
        # The binding's own checks raise ValueError (speech2text_api.cpp:35-42, v5.2.0).
        if not isinstance(audio_data, np.ndarray):
            raise TypeError("audio_data must be a numpy array")
        if audio_data.ndim != 1:
            raise ValueError("Audio data must be 1-dimensional")
        if audio_data.dtype != np.float32:
            raise ValueError("Audio data must be float32 type")
        if not isinstance(task, Speech2TextTask):
            raise TypeError(f"task must be a Speech2TextTask, got {type(task).__name__}")
        if language is not None and not isinstance(language, str):
            raise TypeError(f"language must be a str or None, got {type(language).__name__}")

    def _segments(self, audio: np.ndarray, task: Speech2TextTask, language) -> list:
        step = int(SPEECH_SAMPLE_RATE * SPEECH_SEGMENT_S)
        segments = []
        for start in range(0, len(audio), step):
            chunk = audio[start:start + step]
            hasher = hashlib.blake2b(self._file.digest, digest_size=4)
            hasher.update(f"{task.name}:{language}".encode())
            hasher.update(chunk.tobytes())
            verb = "transcript" if task == Speech2TextTask.TRANSCRIBE else "translation"
            text = f" Simulated {verb} ({language or 'auto'}) {hasher.hexdigest()}."
            segments.append(Speech2TextSegment(start / SPEECH_SAMPLE_RATE,
                                               (start + len(chunk)) / SPEECH_SAMPLE_RATE, text))
        return segments


# ------------------------------------------------------------------ device

@dataclass(frozen=True)
class BoardInformation:
    """What ``Device.control.identify()`` returns (the fields we read)."""
    device_architecture: DeviceArchitectureTypes
    firmware_version: str
    board_name: str = "Hailo-10H (simulated)"
    serial_number: str = "SIMULATED"
    part_number: str = ""
    product_name: str = ""


@dataclass(frozen=True)
class ChipTemperatureInfo:
    ts0_temperature: float
    ts1_temperature: float
    sample_count: int = 1


class Control:
    """``Device.control``: identity and temperature of the simulated chip."""

    def __init__(self, chip: _SimulatedChip):
        self._chip = chip

    def identify(self) -> BoardInformation:
        self._ensure_connected()
        return BoardInformation(DeviceArchitectureTypes.HAILO10H, FW_VERSION)

    def get_chip_temperature(self) -> ChipTemperatureInfo:
        self._ensure_connected()
        celsius = self._chip.temperature_c
        return ChipTemperatureInfo(celsius - 0.5, celsius)

    def _ensure_connected(self) -> None:
        # A lost chip stays lost until a new VDevice is opened on it.
        if self._chip.is_lost(self._chip.generation):
            raise status_error(COMMUNICATION_CLOSED, "the device was lost (injected fault)")


class Device:
    """``Device(device_id=None)``: one physical device, for identity and temperature."""

    _chip: _SimulatedChip

    def __init__(self, device_id=None):
        if device_id not in (None, DEVICE_ID):
            raise HailoRTException("HailoRT device not found in the system")
        self.device_id = DEVICE_ID
        self.control = _make(self._chip, "Control", self._chip)
        self._chip.record("device_open", DEVICE_ID)

    @staticmethod
    def scan() -> list:
        return [DEVICE_ID]

    def release(self) -> None:
        self._chip.record("device_release", self.device_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()
        return False


# ------------------------------------------------------------------ modules

_EXCEPTIONS = (HailoRTException, HailoRTTimeout, HailoRTInvalidArgumentException,
               HailoRTNotFoundException, HailoRTInvalidHEFException,
               HailoRTInvalidOperationException, HailoCommunicationClosedException,
               HailoRTDriverOperationFailedException, HailoRTStreamAborted, HailoRTStatusException)
# The simulated implementation of each recorded class (hailort_api.yaml names).
_IMPLEMENTATIONS = {
    "VDevice": VDevice, "Device": Device, "Control": Control,
    "InferModel": InferModel, "InferModel.InferStream": InferStream,
    "ConfiguredInferModel": ConfiguredInferModel, "ConfiguredInferModel.Bindings": Bindings,
    "ConfiguredInferModel.Bindings.InferStream": _BoundStream, "AsyncInferJob": AsyncInferJob,
    "VLM": VLM, "LLM": LLM, "Speech2Text": Speech2Text, "LLMGeneratorCompletion": LLMGeneratorCompletion,
}
# Classes whose constructor users call (the rest HailoRT makes from internal handles).
_CONSTRUCTED_BY_USERS = frozenset({"VDevice", "Device", "VLM", "LLM", "Speech2Text"})
_VALUES = {"FormatType": FormatType, "HailoSchedulingAlgorithm": HailoSchedulingAlgorithm,
           "DeviceArchitectureTypes": DeviceArchitectureTypes, "Speech2TextTask": Speech2TextTask,
           "LLMGeneratorCompletionStatus": LLMGeneratorCompletionStatus,
           **{cls.__name__: cls for cls in _EXCEPTIONS}}


class SimulatedModules:
    """``hailo_platform`` and ``hailo_platform.genai`` as HailoRT ``surface.version`` lays them out.

    Only what the version exports is there; ``genai`` appears on the top
    module only once ``import_module("hailo_platform.genai")`` ran, as with
    the real package, and is missing altogether where the version has none.
    """

    def __init__(self, chip: _SimulatedChip, surface: hailort_api.ApiSurface):
        self.surface = chip.surface = surface
        chip.classes = {name: recorded.follow(impl, name, surface, {"_chip": chip}, name in _CONSTRUCTED_BY_USERS)
                        for name, impl in _IMPLEMENTATIONS.items() if name in surface.classes}
        self.top = self._module("hailo_platform", chip.classes)
        self.top.__version__ = surface.version
        self.genai = (self._module("hailo_platform.genai", chip.classes)
                      if surface.has_module("hailo_platform.genai") else None)

    def _module(self, name: str, classes: dict) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__file__ = f"<simulated HailoRT {self.surface.version}>"
        for export in self.surface.exports(name):
            value = classes.get(export, _VALUES.get(export))
            if value is not None:
                setattr(module, export, value)
        return module

    def import_module(self, name: str) -> types.ModuleType:
        """``importlib.import_module`` for the simulated package."""
        if name == "hailo_platform":
            return self.top
        if name == "hailo_platform.genai" and self.genai is not None:
            self.top.genai = self.genai  # what the import system does for a submodule
            return self.genai
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)


# ------------------------------------------------------------------ backend

class SimulatedBackend(HailoBackend):
    """The Backend for the simulated accelerator (see the module docstring).

    It is the real backend (backends/hailo.py: importing, opening, identity,
    temperature) on a simulated ``hailo_platform`` of the configured HailoRT
    version, so the real backend's code runs in every test.

    Test hooks: ``calls`` (operation log), ``sleep`` (replaceable clock),
    ``memory_used_mb()``, ``set_temperature(c)``, ``inject_fault(...)``,
    ``release_hang()``, ``clear_faults()``. The last four change the
    simulated chip (what would be physics on hardware), never a HailoRT
    object, so any thread may call them: the daemon's ``simulate`` action
    calls them from the event loop, and ``release_hang`` has to come from
    outside the hung device thread anyway.
    """

    name = "simulated"
    FAULT_KINDS = ("raise", "hang", "lose_device")

    def __init__(self, settings, device):
        self.settings = settings
        self.device = device
        self._chip = _SimulatedChip(settings)
        self.modules = SimulatedModules(self._chip, hailort_api.load(settings.hailort_version))
        super().__init__(device, self.modules.import_module, dev_dir=None)

    @property
    def platform(self):
        """The simulated ``hailo_platform`` (usable before a VDevice is opened, for tests)."""
        return self.modules.top

    # -- per-request knobs (model_params), known only here

    def request_options(self, model_params: dict, infer_budget_s: float, requester_uid: int | None):
        """The simulation knobs of one request's ``model_params``, checked
        while the request is validated (never on the device thread); None
        when it has none:

        * ``simulate_ms``: one inference takes that long, at most the
          watchdog's infer budget (a run longer than its HailoRT timeout
          ends in HailoRTTimeout, as on hardware);
        * ``simulate_hang_ms``: the device call blocks that long, ignoring
          every timeout, like a hung HailoRT call (for watchdog tests).

        Both hold the simulated device, so only the peers that may drive
        it (:meth:`may_drive`) may ask for them: ``forbidden`` otherwise.
        """
        asked = [key for key in REQUEST_KNOBS if key in model_params]
        if not asked:
            return None
        longest = {"simulate_ms": min(MAX_SIMULATE_MS, int(infer_budget_s * 1000)),
                   "simulate_hang_ms": MAX_SIMULATE_MS}
        knobs = {key: optional_number(model_params, key, None, minimum=0, maximum=longest[key], integer=True,
                                      where="model_params.") for key in asked}
        if not self.may_drive(requester_uid):
            raise RequestError(FORBIDDEN, f"model_params.{asked[0]} is accepted only from root or the "
                                          f"daemon's own user")
        return knobs

    @staticmethod
    def may_drive(peer_uid: int | None, own_uid: int | None = None) -> bool:
        """Who may drive the simulated chip (its test hooks hold the device;
        a hang outlasts the watchdog): root and the daemon's own user,
        processes that could already signal or ptrace the daemon."""
        own_uid = os.geteuid() if own_uid is None else own_uid
        return peer_uid is not None and peer_uid in (0, own_uid)

    def request_scope(self, options) -> contextlib.AbstractContextManager:
        """Around one request's inference: its knobs (``request_options``) apply."""
        return super().request_scope(None) if options is None else self._knobs_applied(options)

    @contextlib.contextmanager
    def _knobs_applied(self, knobs: dict):
        chip = self._chip
        previous = chip.infer_ms_override, chip.hang_ms_override
        if knobs.get("simulate_ms") is not None:
            chip.infer_ms_override = knobs["simulate_ms"]
        if knobs.get("simulate_hang_ms") is not None:
            chip.hang_ms_override = knobs["simulate_hang_ms"]
        try:
            yield
        finally:
            chip.infer_ms_override, chip.hang_ms_override = previous

    # -- test hooks

    @property
    def calls(self) -> list:
        """Operations in order, e.g. ("configure", path), ("run", path), ("release", path)
        (the latest CALL_LOG_ENTRIES)."""
        return self._chip.call_log()

    @property
    def sleep(self):
        return self._chip.sleep

    @sleep.setter
    def sleep(self, function) -> None:
        self._chip.sleep = function

    def memory_used_mb(self) -> int:
        return self._chip.memory.used_mb()

    def set_temperature(self, celsius: float) -> None:
        self._chip.temperature_c = float(celsius)

    def inject_fault(self, kind: str, *, status: int | None = None, count: int = 1) -> None:
        """Arm a fault for the next device operations.

        Device operations: opening a VDevice, ``configure``, ``run`` /
        ``run_async``, the genai constructors, ``generate`` / ``generate_all``.
        ``raise`` needs ``status``; ``count`` applies to ``raise`` and
        ``hang``; ``lose_device`` breaks the VDevices open now until a new one
        is created. See _FaultPlan for the details.
        """
        if kind not in self.FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(self.FAULT_KINDS)}, got {kind!r}")
        if kind == "raise" and (isinstance(status, bool) or not isinstance(status, int)):
            raise ValueError("a 'raise' fault needs status=<HailoRT status number>")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count!r}")
        self._chip.faults.arm(kind, status, count, self._chip.generation)

    def release_hang(self) -> None:
        """Let a hung operation (and any armed hang) go on."""
        self._chip.faults.release_hang()

    def clear_faults(self) -> None:
        self._chip.faults.clear()
