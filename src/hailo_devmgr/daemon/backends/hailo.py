"""The real backend: HailoRT through its Python package ``hailo_platform``.

This is the only module of the project that imports ``hailo_platform``, and
it does so lazily: importing this module imports nothing of HailoRT. The
first ``open_vdevice()`` call (on the device thread) prepends the configured
``python_path`` entries to ``sys.path`` and imports ``hailo_platform``; the
module is kept in ``platform`` from then on, and a failed import is retried
on the next ``open_vdevice()``. Nothing of HailoRT is imported anywhere else,
so the daemon starts, and reports why, on a host without HailoRT.

Facts about HailoRT (public sources, field reports) that this relies on but that are **uncertain**:

- Device node names. Drivers up to 5.2 and Hailo-8 create ``/dev/hailo0``,
  ...; the 5.3 driver may create ``/dev/h1x-0`` instead. Both globs are in
  ``DEVICE_NODE_GLOBS``; the node check only gives a clearer reason than
  HailoRT would, HailoRT itself finds the device (``Device.scan()``).
- ``control.identify()`` field formats: ``device_architecture`` is an
  IntEnum whose ``str()`` is the bare name in the bindings seen so far, but
  we take ``.name`` when present and strip any ``Enum.`` prefix in case a
  version prints the qualified name; ``str(firmware_version)`` looks like
  ``"5.3.0 (release,app)"`` and is passed on verbatim. Either may change
  between HailoRT versions, which is why identity never raises.
- Opening a ``Device`` beside our own ``VDevice`` in the same process is a
  field report for Hailo-10H on HailoRT 5.3, in that order: the ``Device``
  first, then the ``VDevice``. We keep that order (one ``Device`` opened
  before the VDevice and kept for identity and temperature); if it fails,
  identity and temperature are simply unknown.

Checked against Hailo's sources (hailo-ai/hailort, see
docs/hailort-api.md): ``hailo_platform/__init__.py`` does not import its
``genai`` subpackage (v5.1.1, v5.2.0), so it is imported here explicitly;
v4.23.0 has none, and genai model types then fail with the version named.
"""
from __future__ import annotations

import contextlib
import glob
import importlib
import logging
import os
import pwd
import sys
from typing import Any, Callable

from .. import hailort_status
from ..config import DeviceConfig
from . import BackendUnavailable, DeviceIdentity

log = logging.getLogger(__name__)

MODULE_NAME = "hailo_platform"
GENAI_MODULE_NAME = "hailo_platform.genai"
# Device nodes, relative to the dev directory: hailo_chardev (driver <= 5.2,
# Hailo-8) and, possibly, hailo1x (5.3 driver).
DEVICE_NODE_GLOBS = ("hailo*", "h1x-*")
DEFAULT_DEV_DIR = "/dev"
INSTALL_HINT = "install python3-h10-hailort (Hailo-10H) or python3-hailort (Hailo-8)"


_NOTHING_TO_APPLY = contextlib.nullcontext()


class HailoBackend:
    """Backend on a real Hailo-10H / Hailo-8 / Hailo-8L (see backends.Backend)."""

    name = "hailo"

    def __init__(self, device: DeviceConfig, importer: Callable[[str], Any] = importlib.import_module,
                 *, python_path: tuple[str, ...] = (), dev_dir: str | None = DEFAULT_DEV_DIR,
                 access: Callable[[str, int], bool] = os.access):
        self._config = device
        self._importer = importer
        self._python_path = tuple(python_path)
        self._dev_dir = dev_dir  # None: no device node to check (the simulated chip)
        # os.access by default; tests inject their own so that the result
        # does not depend on running as root (root may open anything).
        self._access = access
        self._platform: Any = None
        # Why hailo_platform.genai is missing (None while it imported fine).
        self.genai_missing: str | None = None
        self._identity: DeviceIdentity | None = None
        self._identify_warned = False
        self._device_id: str | None = None
        self._info_device: Any = None

    # -- the hailo_platform module -------------------------------------------

    @property
    def platform(self) -> Any:
        if self._platform is None:
            raise BackendUnavailable("HailoRT is not loaded yet (no VDevice has been opened)")
        return self._platform

    @property
    def hailort_version(self) -> str | None:
        """``hailo_platform.__version__`` once imported, e.g. ``"5.2.0"``."""
        version = getattr(self._platform, "__version__", None)
        return str(version) if version is not None else None

    def _load_platform(self) -> Any:
        if self._platform is None:
            self._extend_sys_path()
            platform = self._import_platform()
            self.genai_missing = self._import_genai(platform)
            self._platform = platform
            log.info("using HailoRT Python package %s from %s%s",
                     getattr(platform, "__version__", "(unknown version)"),
                     getattr(platform, "__file__", "?"),
                     f" (no genai: {self.genai_missing})" if self.genai_missing else " with genai")
        return self._platform

    def _import_genai(self, platform: Any) -> str | None:
        """Import ``hailo_platform.genai`` (which ``import hailo_platform``
        does not do), so ``platform.genai`` exists; the reason when it cannot."""
        try:
            self._importer(GENAI_MODULE_NAME)
        except ImportError as exc:
            version = getattr(platform, "__version__", "?")
            return f"HailoRT {version} has no {GENAI_MODULE_NAME} ({exc})"
        except Exception as exc:
            return f"{GENAI_MODULE_NAME} failed to import: {type(exc).__name__}: {exc}"
        return None

    def _extend_sys_path(self) -> None:
        # Prepend in the configured order, so the first entry wins over the
        # Debian package; skip entries already present so that retries after a
        # failed import do not grow sys.path.
        for entry in reversed(self._python_path):
            if entry not in sys.path:
                sys.path.insert(0, entry)

    def _import_platform(self) -> Any:
        try:
            return self._importer(MODULE_NAME)
        except ImportError as exc:
            searched = f" (also searched {', '.join(self._python_path)})" if self._python_path else ""
            raise BackendUnavailable(
                f"HailoRT Python package ({MODULE_NAME}) is not installed: {exc}{searched}; "
                f"{INSTALL_HINT}") from exc
        except Exception as exc:
            # Installed but broken, e.g. a wheel built against another numpy ABI.
            raise BackendUnavailable(
                f"HailoRT Python package ({MODULE_NAME}) failed to import: "
                f"{type(exc).__name__}: {exc}") from exc

    # -- opening -------------------------------------------------------------

    def open_vdevice(self) -> Any:
        platform = self._load_platform()
        self._check_device_nodes()
        # The Device first, then the VDevice: the order known to work on a 10H.
        self._open_info_device(platform)
        try:
            return self._create_vdevice(platform)
        except BaseException:
            self._release_info_device()
            raise

    def _device_nodes(self) -> list[str]:
        nodes: list[str] = []
        for pattern in DEVICE_NODE_GLOBS:
            matches = glob.glob(os.path.join(self._dev_dir, pattern))
            nodes.extend(path for path in sorted(matches) if not os.path.isdir(path))
        return nodes

    def _check_device_nodes(self) -> None:
        """Turn the two common setup mistakes into a clear reason before
        HailoRT reports them as a bare status number."""
        if self._dev_dir is None:
            return
        nodes = self._device_nodes()
        if not nodes:
            wanted = ", ".join(os.path.join(self._dev_dir, p) for p in DEVICE_NODE_GLOBS)
            raise BackendUnavailable(f"no Hailo device node ({wanted}): is the PCIe driver loaded?")
        usable = [node for node in nodes if self._access(node, os.R_OK | os.W_OK)]
        if not usable:
            raise BackendUnavailable(
                f"no read/write permission on {', '.join(nodes)}: the daemon's user "
                f"{_user_name()} needs to be in group 'hailo' (see the package's udev rule)")
        for node in nodes:
            if node not in usable:
                log.warning("no read/write permission on %s; using the others", node)

    def _create_vdevice(self, platform: Any) -> Any:
        group_id = self._config.group_id
        scheduling = self._config.scheduling_algorithm
        try:
            params = platform.VDevice.create_params()
            params.group_id = group_id
            # HailoRT's default is ROUND_ROBIN: set it only to turn the
            # scheduler off (genai models may need it on: uncertain).
            if scheduling == "none":
                params.scheduling_algorithm = platform.HailoSchedulingAlgorithm.NONE
            vdevice = platform.VDevice(params)
        except Exception as exc:
            raise BackendUnavailable(_open_failure_reason(exc, group_id)) from exc
        log.info("opened Hailo VDevice (group_id %s, scheduler %s)", group_id, scheduling)
        return vdevice

    # -- identity and temperature -------------------------------------------

    def _open_info_device(self, platform: Any) -> None:
        """The ``Device`` read for identity and temperature, opened before the VDevice.

        Kept open: status asks often, and opening a Device costs a driver
        open and a control handshake each time."""
        if self._info_device is not None:
            return
        try:
            self._device_id = str(platform.Device.scan()[0])
            self._info_device = platform.Device(self._device_id)
        except Exception as exc:
            log.warning("cannot open the Hailo Device for identity and temperature (%s); both "
                        "stay unknown", hailort_status.describe(exc))
            self._info_device = None

    def identify(self, vdevice: Any) -> DeviceIdentity:
        if self._identity is not None:
            return self._identity
        try:
            info = self._require_info_device().control.identify()
            identity = DeviceIdentity(self._device_id, _architecture_name(info.device_architecture),
                                      _text_or_none(info.firmware_version))
        except Exception as exc:
            self._warn_identify_once(self._device_id, exc)
            return DeviceIdentity(self._device_id, None, None)
        # Cached: the chip and its firmware cannot change while we hold it.
        self._identity = identity
        return identity

    def _require_info_device(self) -> Any:
        if self._info_device is None:
            raise BackendUnavailable("no Device open for identity and temperature")
        return self._info_device

    def _warn_identify_once(self, device_id: str | None, exc: Exception) -> None:
        # Identity is informational and may be asked for on every status
        # request: one warning is enough.
        level = logging.DEBUG if self._identify_warned else logging.WARNING
        self._identify_warned = True
        log.log(level, "cannot identify Hailo device %s: %s",
                device_id or "(unknown id)", hailort_status.describe(exc))

    def temperature(self, vdevice: Any) -> float | None:
        try:
            reading = self._require_info_device().control.get_chip_temperature()
            return float(max(reading.ts0_temperature, reading.ts1_temperature))
        except Exception as exc:
            log.debug("cannot read the chip temperature: %s", hailort_status.describe(exc))
            return None

    def _release_info_device(self) -> None:
        device, self._info_device = self._info_device, None
        if device is not None:
            _release_quietly(device, "the Device used for identity and temperature")

    # -- the rest of the Backend interface -----------------------------------

    def request_options(self, model_params: dict, infer_budget_s: float, requester_uid: int | None):
        return None   # no per-request knobs of its own

    def request_scope(self, options) -> contextlib.AbstractContextManager:
        return _NOTHING_TO_APPLY

    def close_vdevice(self, vdevice: Any) -> None:
        # The VDevice goes first (models were released before it), then the
        # Device that was opened before it: the reverse of the opening order.
        _release_quietly(vdevice, "the VDevice")
        self._release_info_device()
        # The next VDevice may sit on another chip (rebuild after a fault).
        self._device_id = None
        self._identity = None


def _open_failure_reason(exc: Exception, group_id: str) -> str:
    status = hailort_status.status_of(exc)
    detail = hailort_status.describe(exc)
    if status in hailort_status.OWNED_ELSEWHERE:
        return (f"device owned by another process ({detail}); stop it, or give both "
                f"the same shared device.group_id (ours: {group_id})")
    if status == hailort_status.OPEN_FILE_FAILURE:
        return (f"cannot open the Hailo device ({detail}): the daemon's user "
                f"{_user_name()} needs read/write access to the device node (group 'hailo')")
    if status == hailort_status.DRIVER_OPERATION_FAILED:
        # HailoRT reports 36 after failing to open the node (13), so
        # permissions are as likely a cause as the driver itself.
        return (f"cannot open the Hailo device ({detail}): check the device node's "
                f"permissions (group 'hailo') and 'dmesg | grep -i hailo'")
    return f"cannot open the Hailo device: {detail}"


def _architecture_name(value: Any) -> str | None:
    name = getattr(value, "name", None)
    text = name if isinstance(name, str) and name else _text_or_none(value)
    # "DeviceArchitectureTypes.HAILO10H" -> "HAILO10H"
    return text.rsplit(".", 1)[-1] if text else None


def _text_or_none(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _release_quietly(obj: Any, what: str) -> None:
    try:
        obj.release()
    except Exception as exc:
        log.warning("releasing %s failed: %s", what, hailort_status.describe(exc))


def _user_name() -> str:
    uid = os.geteuid()
    try:
        return f"'{pwd.getpwuid(uid).pw_name}'"
    except KeyError:  # a uid without a passwd entry (DynamicUser, containers)
        return f"(uid {uid})"
