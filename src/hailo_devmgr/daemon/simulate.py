"""The ``simulate`` action: drive the simulated accelerator of a running daemon.

Tests (and demos) change the simulated chip's temperature and inject
faults into the real process, through its socket:

    {"action": "simulate", "temperature_c": 90}
    {"action": "simulate", "fault": {"kind": "raise", "status": 81, "count": 2}}
    {"action": "simulate", "fault": {"kind": "hang"}}      then {"release_hang": true}
    {"action": "simulate", "fault": {"kind": "lose_device"}}
    {"action": "simulate", "clear_faults": true}

Who may: it exists only on the simulated backend (``backend: simulated``);
on real hardware it is an unknown action, answered exactly as any other
(``unknown_action``), so nobody can tell a test hook is there. On the
simulated backend, only a peer whose uid (SO_PEERCRED) is 0 or the
daemon's own may use it: processes that could already signal or ptrace
the daemon. Members of group ``hailo`` cannot.

The hooks change the simulated chip, never a HailoRT object, so they run
here on the event loop (``release_hang`` must not wait for the device
thread: that is the thread hanging). A new temperature shows in
``device_status`` and the thermal guard after the device thread's next
reading (every ``thermal.interval_s``).
"""
from __future__ import annotations

import logging

from ..wire.protocol import BAD_REQUEST, FORBIDDEN, RequestError, json_type, optional_number, shown, unknown_action

log = logging.getLogger(__name__)

FAULT_KINDS = ("raise", "hang", "lose_device")
OPERATIONS = ("temperature_c", "fault", "release_hang", "clear_faults")


def authorize(backend, peer_uid: int | None) -> None:
    """Raise ``unknown_action`` off the simulated backend, ``forbidden`` unless this peer may drive it."""
    if backend.name != "simulated":
        raise unknown_action("simulate")
    if not backend.may_drive(peer_uid):
        raise RequestError(FORBIDDEN, "simulate is accepted only from root or the daemon's own user")


def apply(body: dict, backend, peer_uid: int | None) -> dict:
    """Check, then apply the operations of one ``simulate`` request, in the order of OPERATIONS."""
    authorize(backend, peer_uid)
    asked = [name for name in OPERATIONS if body.get(name) not in (None, False)]
    if not asked:
        raise RequestError(BAD_REQUEST, f"simulate needs at least one of {', '.join(OPERATIONS)}")
    temperature = optional_number(body, "temperature_c", None, minimum=-40, maximum=200)
    fault = _fault(body.get("fault"))
    for flag in ("release_hang", "clear_faults"):
        if body.get(flag) not in (None, False, True):
            raise RequestError(BAD_REQUEST, f"{flag} must be true, got {json_type(body[flag])}")
    if body.get("clear_faults"):
        backend.clear_faults()
    if temperature is not None:
        backend.set_temperature(temperature)
    if fault is not None:
        backend.inject_fault(fault["kind"], status=fault["status"], count=fault["count"])
    if body.get("release_hang"):
        backend.release_hang()
    log.warning("simulate: %s", ", ".join(f"{name}={shown(body[name])}" for name in asked))
    return {"applied": asked}


def _fault(value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError(BAD_REQUEST, f"fault must be an object {{kind, status?, count?}}, got "
                                        f"{json_type(value)}")
    kind = value.get("kind")
    if kind not in FAULT_KINDS:
        raise RequestError(BAD_REQUEST, f"fault.kind must be one of {', '.join(FAULT_KINDS)}, got {shown(kind)}")
    status = optional_number(value, "status", None, minimum=0, maximum=1000, integer=True, where="fault.")
    if kind == "raise" and status is None:
        raise RequestError(BAD_REQUEST, "fault.status is required for kind raise (a HailoRT status number)")
    count = optional_number(value, "count", 1, minimum=1, maximum=1000, integer=True, where="fault.")
    return {"kind": kind, "status": status, "count": count}
