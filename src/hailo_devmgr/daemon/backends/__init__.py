"""Backends: what stands between the device thread and an accelerator.

A backend exposes ``platform``, a namespace with the parts of the
``hailo_platform`` API we use (``VDevice``, ``FormatType``,
``HailoSchedulingAlgorithm``, the exception classes, ``genai.VLM``, ...).
Handlers use only ``platform``, so they run unchanged on real hardware and
on the simulated accelerator. The few things that are not part of that API
(opening, identifying, temperature) are methods of the backend itself.

Every method here is called from the device thread only.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol


class BackendUnavailable(Exception):
    """The accelerator cannot be used (not installed, absent, owned elsewhere)."""


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str | None
    architecture: str | None
    fw_version: str | None


class Backend(Protocol):
    name: str
    platform: Any
    # hailo_platform.__version__ once imported (None before), and why
    # hailo_platform.genai is missing (None when it imported).
    hailort_version: str | None
    genai_missing: str | None

    def open_vdevice(self) -> Any:
        """Create the VDevice; raises BackendUnavailable with a reason."""

    def identify(self, vdevice: Any) -> DeviceIdentity:
        """Device id, architecture and firmware of the open device."""

    def temperature(self, vdevice: Any) -> float | None:
        """Chip temperature in °C, or None when it cannot be read."""

    def request_options(self, model_params: dict, infer_budget_s: float, requester_uid: int | None) -> Any:
        """The backend's own knobs in a request's ``model_params``, checked
        (RequestError) while the request is validated; None when it has
        none. Only the simulated backend has any (``simulate_ms``...): no
        other module knows their names. ``requester_uid``: the peer's (the
        daemon's own for its pins; None when unknown)."""

    def request_scope(self, options: Any) -> AbstractContextManager:
        """Context around one request's inference on the device thread, with
        what ``request_options`` gave (None: nothing to apply)."""

    def close_vdevice(self, vdevice: Any) -> None:
        """Release the VDevice (after every model object was released)."""


def create_backend(config) -> Backend:
    """The backend the configuration names. Imports nothing of HailoRT yet."""
    if config.backend == "simulated":
        from .simulated import SimulatedBackend
        return SimulatedBackend(config.simulated, config.device)
    from .hailo import HailoBackend
    return HailoBackend(config.device, python_path=config.device.python_path)
