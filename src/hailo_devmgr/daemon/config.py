"""The daemon's configuration: one YAML file plus environment overrides.

Built once at start (and again on SIGHUP), validated here and nowhere else;
no other module reads the environment. Every key, its default and its
meaning is also written in etc/hailo/device-manager.yaml, the conffile.
A defect stops the daemon with one line: ``<file>: <key>: <what is wrong>``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from .cpu_affinity import CpuPlacement

DEFAULT_CONFIG_PATH = "/etc/hailo/device-manager.yaml"
DEFAULT_SOCKET_PATH = "/run/hailo/device.sock"
# Where HEFs are installed: Raspberry Pi's hailo-models package, hailo-apps'
# resources (/usr/local/hailo/resources/models/<arch>/), and ours (group hailo).
DEFAULT_MODEL_DIRS = ("/usr/share/hailo-models", "/usr/local/hailo/resources/models", "/var/lib/hailo/models")
# Keys whose lists a drop-in adds to instead of replacing.
ADDITIVE_KEYS = ("model_dirs", "pin")
BACKENDS = ("hailo", "simulated")
# HailoRT versions whose API is recorded (backends/hailort_api/*.yaml), oldest first.
SIMULATED_HAILORT_VERSIONS = ("4.23.0", "5.1.1", "5.2.0")
SCHEDULING_ALGORITHMS = ("round_robin", "none")
# The model types handlers/ implements (a test keeps the two lists equal).
MODEL_TYPES = ("generic", "clip", "vlm", "vlm_chat", "whisper", "ocr", "depth", "pose", "llm")
LOG_LEVELS = ("debug", "info", "warning", "error")
MiB = 1024 * 1024
MIN_IDLE_EXIT_S = 10.0   # see _idle_exit


class ConfigError(Exception):
    """The configuration cannot be used; the message names source and key."""


# Each field's metadata: "check" validates and converts a raw value, raising
# ValueError with a short reason; "help" is not needed here (the conffile has it).

def _integer(minimum: int, maximum: int | None = None):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound}, got {value}")
        return value
    return check


def _number(minimum: float, maximum: float | None = None):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound}, got {value}")
        return float(value)
    return check


def _idle_exit(value):
    """0 (never), or at least MIN_IDLE_EXIT_S: every idle exit costs a start of the
    service when a client comes, and systemd fails the socket after
    StartLimitBurst=10 starts a minute."""
    seconds = _number(0.0, 30 * 86400.0)(value)
    if 0 < seconds < MIN_IDLE_EXIT_S:
        raise ValueError(f"must be 0 (never) or at least {MIN_IDLE_EXIT_S:g} (each idle exit costs a start, "
                         f"and systemd allows 10 a minute), got {value}")
    return seconds


def _cpu_affinity(value):
    """auto, off, or a CPU this process may run on."""
    if value not in ("auto", "off") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"must be auto, off or a CPU number, got {value!r}")
    CpuPlacement.choose(value)   # a CPU number the process may not use: ValueError
    return value


def _choice(*choices: str):
    def check(value):
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value
    return check


def _absolute_path(value):
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return value


def _path(value):
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a path, got {value!r}")
    return value


def _optional_path(value):
    """An absolute path, or empty for "the default place"."""
    if value == "":
        return value
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"must be an absolute path or empty, got {value!r}")
    return value


def _path_list(value):
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be a non-empty list of absolute paths, got {value!r}")
    return tuple(_absolute_path(item) for item in value)


def _file_mode(value):
    # YAML reads 0660 as the octal int 432 and "0660" as a string: take both.
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError(f"must be an octal mode like \"0660\", got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"must be an octal mode like \"0660\", got {value!r}")
    return value


def _shape(value):
    if (not isinstance(value, list) or not value or len(value) > 8
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"must be a list of positive integers, got {value!r}")
    return tuple(value)


def _pin_list(value):
    if not isinstance(value, list):
        raise ValueError(f"must be a list of models, got {value!r}")
    pins = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"[{index}] must be a mapping with model_type and model_path")
        unknown = set(item) - {"model_type", "model_path", "model_params"}
        if unknown:
            raise ValueError(f"[{index}] has unknown key {sorted(unknown)[0]!r}")
        model_type, model_path = item.get("model_type"), item.get("model_path")
        if not isinstance(model_type, str) or not isinstance(model_path, str) or not model_path:
            raise ValueError(f"[{index}] needs model_type and model_path strings")
        params = item.get("model_params") or {}
        if not isinstance(params, dict):
            raise ValueError(f"[{index}].model_params must be a mapping")
        pins.append(PinnedModel(model_type, model_path, params))
    return tuple(pins)


def _keep_alive_map(value):
    """``{default: seconds, <model_type>: seconds}``; a negative number means forever."""
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of model type (or default) to seconds, got {value!r}")
    checked = {"default": -1.0}
    for name, seconds in value.items():
        if name != "default" and name not in MODEL_TYPES:
            raise ValueError(f"keys are 'default' or a model type ({', '.join(MODEL_TYPES)}), "
                             f"got {name!r}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise ValueError(f"{name}: must be a number of seconds (-1 = forever, 0 = unload "
                             f"right after use), got {seconds!r}")
        checked[name] = float(seconds)
    return checked


def _key(check, default, env: str | None = None):
    return field(default=default, metadata={"check": check, "env": env})


@dataclass(frozen=True)
class PinnedModel:
    model_type: str
    model_path: str
    model_params: dict


@dataclass(frozen=True)
class WatchdogConfig:
    # How long one device operation may take before the device thread counts
    # as hung and the WATCHDOG=1 pings stop (systemd then restarts us).
    load_budget_s: float = _key(_number(0.1), 300.0)
    infer_budget_s: float = _key(_number(0.1), 120.0)
    other_budget_s: float = _key(_number(0.1), 60.0)


@dataclass(frozen=True)
class DeviceConfig:
    # Seconds between attempts to open a device that was unavailable.
    retry_s: float = _key(_number(0.0), 5.0)
    # HailoRT VDevice group: UNIQUE = exclusive owner.
    group_id: str = _key(_path, "UNIQUE")
    # HailoRT's model scheduler: round_robin (HailoRT's default) or none.
    scheduling_algorithm: str = _key(_choice(*SCHEDULING_ALGORITHMS), "round_robin")
    # Extra folders to import hailo_platform from (a wheel outside Debian).
    python_path: tuple = _key(lambda v: () if v == [] else _path_list(v), ())
    # After a runtime fault (device lost, context broken): how many times the
    # device thread rebuilds the VDevice on its own, and the waits between
    # attempts (the first attempt is immediate; the wait doubles up to the max).
    rebuild_attempts: int = _key(_integer(0, 1000), 5)
    rebuild_backoff_s: float = _key(_number(0.0, 3600.0), 1.0)
    rebuild_backoff_max_s: float = _key(_number(0.0, 3600.0), 30.0)


@dataclass(frozen=True)
class ThermalConfig:
    # At or above limit_c new device work is refused (code overheated) until
    # the chip is below resume_c again. interval_s: how often the device
    # thread reads the temperature, idle or busy.
    limit_c: float = _key(_number(0.0, 200.0), 80.0)
    resume_c: float = _key(_number(0.0, 200.0), 75.0)
    interval_s: float = _key(_number(0.05, 3600.0), 5.0)


PRIORITY_NAMES = ("interactive", "normal", "batch")


def _client_priorities(value):
    """[{uid: 1001, priority: interactive}, {unit: clip.service, priority: batch}, ...]"""
    if not isinstance(value, list):
        raise ValueError(f"must be a list of {{uid or unit, priority}} mappings, got {value!r}")
    rules = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - {"uid", "unit", "priority"} or len(item) != 2:
            raise ValueError(f"[{index}] must have priority and exactly one of uid, unit")
        if item.get("priority") not in PRIORITY_NAMES:
            raise ValueError(f"[{index}].priority must be one of {', '.join(PRIORITY_NAMES)}")
        if "uid" in item and (isinstance(item["uid"], bool) or not isinstance(item["uid"], int)):
            raise ValueError(f"[{index}].uid must be an integer")
        if "unit" in item and (not isinstance(item["unit"], str) or not item["unit"]):
            raise ValueError(f"[{index}].unit must be a unit name such as clip-search.service")
        rules.append(dict(item))
    return tuple(rules)


@dataclass(frozen=True)
class SchedulingConfig:
    # fair: priorities, aging, round robin, affinity; fifo: first come first served.
    policy: str = _key(_choice("fair", "fifo"), "fair")
    max_queue: int = _key(_integer(1, 100_000), 256)
    max_queue_per_client: int = _key(_integer(1, 100_000), 128)
    # A waiting job moves up one priority class per aging_s (0: never).
    aging_s: float = _key(_number(0.0, 86400.0), 10.0)
    affinity_max_skips: int = _key(_integer(0, 1000), 4)
    # Requests for one model waiting in a row run in one device call while
    # the call keeps the device at most about this long (0: never).
    max_batch_ms: float = _key(_number(0.0, 1000.0), 2.0)
    # Requests a v2 connection may have in flight at once.
    max_inflight_per_connection: int = _key(_integer(1, 10_000), 64)
    # Default priority of a client by uid or systemd unit (a request's own
    # `priority` field wins).
    client_priorities: tuple = _key(_client_priorities, ())


def _id_list(value):
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise ValueError(f"must be a list of numeric ids, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class AdminConfig:
    # Besides root and the daemon's own user, who may act on other clients'
    # models (e.g. unload a model another uid loaded).
    uids: tuple = _key(_id_list, ())
    groups: tuple = _key(_id_list, ())


@dataclass(frozen=True)
class SimulatedConfig:
    load_ms: int = _key(_integer(0, 600_000), 200)
    infer_ms: int = _key(_integer(0, 600_000), 20)
    # genai LLM: time per generated token (a VLM spreads infer_ms over its answer).
    token_ms: int = _key(_integer(0, 600_000), 20)
    device_memory_mb: int = _key(_integer(1), 4096)
    model_memory_mb: int = _key(_integer(0), 512)
    lock_path: str = _key(_absolute_path, "/tmp/hailo-devmgr-simulated.lock")
    image_shape: tuple = _key(_shape, (224, 224, 3))
    vlm_frame_shape: tuple = _key(_shape, (336, 336, 3))
    embedding_size: int = _key(_integer(1, 65536), 512)
    temperature_c: float = _key(_number(-40.0, 200.0), 53.0)
    # Which HailoRT's API the simulated hailo_platform follows (the recorded
    # surfaces in backends/hailort_api/; default the newest).
    hailort_version: str = _key(_choice(*SIMULATED_HAILORT_VERSIONS), SIMULATED_HAILORT_VERSIONS[-1])


@dataclass(frozen=True)
class Config:
    backend: str = _key(_choice(*BACKENDS), "hailo", "HAILO_DEVICE_BACKEND")
    socket_path: str = _key(_path, DEFAULT_SOCKET_PATH, "HAILO_DEVICE_SOCKET")
    socket_mode: int = _key(_file_mode, 0o660)
    socket_dir_mode: int = _key(_file_mode, 0o755)
    model_dirs: tuple = _key(_path_list, DEFAULT_MODEL_DIRS, "HAILO_DEVICE_MODEL_DIRS")
    max_message_bytes: int = _key(_integer(1024, 1024 * MiB), 64 * MiB,
                                  "HAILO_DEVICE_MAX_MESSAGE_BYTES")
    max_pending_bytes: int = _key(_integer(1024, 4096 * MiB), 256 * MiB)
    # ... of which one uid may hold (however many connections it opens; the
    # smaller of the two applies).
    max_pending_bytes_per_uid: int = _key(_integer(1024, 4096 * MiB), 64 * MiB)
    # Descriptors received with requests and not yet used, in all and per uid.
    max_pending_fds: int = _key(_integer(16, 100_000), 512)
    max_pending_fds_per_uid: int = _key(_integer(16, 100_000), 128)
    max_tensor_elements: int = _key(_integer(1), 64 * MiB)
    # whisper: longest audio accepted, in seconds (transcribed in 30 s windows).
    max_audio_s: int = _key(_integer(1, 4 * 3600), 600)
    # Protocol v2: tensor results of at least this many bytes go back in a
    # sealed memfd to clients that asked for shared memory in hello.
    shm_result_min_bytes: int = _key(_integer(0), 1 * MiB)
    # Protocol v2: bytes of shared memory one connection may register for
    # reuse (register_buffer; 0 turns registered buffers off). The pages are
    # the client's; the daemon holds only their mappings.
    shm_buffer_max_bytes: int = _key(_integer(0, 64 * 1024 * MiB), 256 * MiB)
    # Connections at once, in all and per client uid; more are refused.
    max_connections: int = _key(_integer(1, 100_000), 256)
    max_connections_per_uid: int = _key(_integer(1, 100_000), 64)
    # A frame whose first byte has come must be complete within this time,
    # or the connection is closed (a stalled half-sent frame holds nothing).
    frame_timeout_s: float = _key(_number(0.1, 3600.0), 30.0)
    # Close connections idle this long (0: never; services may keep one open).
    idle_timeout_s: float = _key(_number(0.0, 86400.0), 0.0)
    # Exit after this long with no connection, no queued work and no pinned
    # model (0: never); the socket unit starts the daemon again on the next
    # connection, and the device is free for other programs meanwhile.
    idle_exit_s: float = _key(_idle_exit, 0.0)
    # Where a loan of the device (hailo-devmgr lend) is kept across restarts;
    # empty: $RUNTIME_DIRECTORY/lent.json under systemd, else memory only.
    lend_state_file: str = _key(_optional_path, "")
    max_loaded_models: int = _key(_integer(1, 64), 8, "HAILO_DEVICE_MAX_LOADED_MODELS")
    pin: tuple = _key(_pin_list, ())
    # Seconds an idle model stays loaded, per model type: -1 forever, 0 unload
    # right after use. A request's own keep_alive wins. Pinned models stay.
    keep_alive: dict = field(default_factory=lambda: {"default": -1.0},
                             metadata={"check": _keep_alive_map, "env": None})
    log_level: str = _key(_choice(*LOG_LEVELS), "info", "HAILO_DEVICE_LOG_LEVEL")
    # The CPU the event loop and the device thread share (cpu_affinity.py).
    cpu_affinity: str | int = _key(_cpu_affinity, "auto")
    device: DeviceConfig = field(default_factory=DeviceConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    thermal: ThermalConfig = field(default_factory=ThermalConfig)
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    simulated: SimulatedConfig = field(default_factory=SimulatedConfig)


def _build(cls, raw: dict, source: str, prefix: str = ""):
    """Validate a mapping against a config dataclass, recursively."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: must be a mapping")
    known = {f.name: f for f in fields(cls)}
    for name in raw:
        if name not in known:
            raise ConfigError(f"{source}: {prefix}{name}: unknown key (known: {', '.join(known)})")
    values = {}
    for name, value in raw.items():
        spec = known[name]
        check = spec.metadata.get("check")
        if check is None:  # a nested section such as watchdog:
            section = {} if value is None else value
            values[name] = _build(spec.default_factory, section, source, f"{prefix}{name}.")
            continue
        try:
            values[name] = check(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {prefix}{name}: {exc}") from None
    return cls(**values)


def _env_overrides(config: Config, environ) -> Config:
    changes = {}
    for spec in fields(Config):
        env = spec.metadata.get("env")
        if not env or env not in environ:
            continue
        text = environ[env]
        if spec.name == "model_dirs":
            value: Any = [part for part in text.split(":") if part]
        else:
            try:
                value = yaml.safe_load(text) if text else text
            except yaml.YAMLError:
                value = text
            if spec.name == "socket_path":
                value = text
        try:
            changes[spec.name] = spec.metadata["check"](value)
        except ValueError as exc:
            raise ConfigError(f"environment {env}: {exc}") from None
    return replace(config, **changes)


def load(path: str | os.PathLike | None = None, environ=None, *, required: bool | None = None) -> Config:
    """Read the config file (if any) and its drop-ins, then apply environment overrides.

    ``path`` None means the default file, which may be absent (defaults
    apply); a path given explicitly must exist. Drop-ins are the ``*.yaml``
    files of ``<path without .yaml>.d/`` (``/etc/hailo/device-manager.d/``),
    read in name order: their ``model_dirs`` and ``pin`` entries are added to
    the file's (a service adds its own model folder without editing the
    conffile); any other key replaces the file's value.
    """
    environ = os.environ if environ is None else environ
    if path is None:
        path = environ.get("HAILO_DEVICE_CONFIG") or DEFAULT_CONFIG_PATH
        required = bool(environ.get("HAILO_DEVICE_CONFIG")) if required is None else required
    elif required is None:
        required = True
    source = str(path)
    raw = _read_yaml(Path(path), required)
    _build(Config, raw, source)  # the file's own errors name it, before any drop-in is merged
    dropins = sorted(Path(path).with_suffix(".d").glob("*.yaml"))
    for dropin in dropins:
        extra = _read_yaml(dropin, True)
        _build(Config, extra, str(dropin))  # each drop-in's own errors name it
        raw = _merge(raw, extra)
    if dropins:
        source += f" (with {', '.join(dropin.name for dropin in dropins)})"
    config = _env_overrides(_build(Config, raw, source), environ)
    if config.thermal.resume_c >= config.thermal.limit_c:
        raise ConfigError(f"{source}: thermal.resume_c: must be below thermal.limit_c "
                          f"({config.thermal.limit_c}), got {config.thermal.resume_c}")
    if config.max_pending_bytes < config.max_message_bytes:
        raise ConfigError(f"{source}: max_pending_bytes: must be at least max_message_bytes "
                          f"({config.max_message_bytes}), got {config.max_pending_bytes}")
    return config


def _read_yaml(path: Path, required: bool) -> dict:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{source}: file not found") from None
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f"line {where.line + 1}: " if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: {at}YAML error: {problem}") from None
    return {} if raw is None else raw


def _merge(base: Any, extra: dict) -> dict:
    """``base`` with a drop-in's keys: additive lists appended, sections merged, the rest replaced."""
    merged = dict(base) if isinstance(base, dict) else {}
    for key, value in extra.items():
        if key in ADDITIVE_KEYS and isinstance(value, list):
            current = merged.get(key)
            if current is None:
                current = list(DEFAULT_MODEL_DIRS) if key == "model_dirs" else []
            merged[key] = [*current, *value] if isinstance(current, list) else value
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def describe(config: Config) -> dict:
    """The effective configuration as plain data (for logs and --check-config)."""
    def plain(value):
        if is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, tuple):
            return [plain(item) for item in value]
        return value
    return plain(config)
