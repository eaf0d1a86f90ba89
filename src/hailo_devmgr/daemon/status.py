"""What ``ping``, ``status`` and ``device_status`` answer, and systemd's STATUS=
line: built on the event loop from snapshots (the registry's published
models, the runtime's last readings, the queue's counters), never behind
device work. ``d`` is the dispatcher (dispatch.py), which holds them all.
"""
from __future__ import annotations

import os
import time

from .._version import __version__


def uptime(d) -> float:
    return round(time.monotonic() - d.started_mono, 3)


# Connections described in one status answer: a uid that holds many
# connections and pings on each would otherwise make every answer, and the
# loop's work per ping, grow with the number of connections.
MAX_LISTED_CLIENTS = 32


def status_payload(d, asker=None) -> dict:
    """``asker``: the session asking (listed first), or None."""
    reason, model, at = d.registry.last_capacity_event
    return {
        "device_id": d.runtime.identity.device_id,
        "loaded_models": list(d.registry.snapshot),
        "uptime_seconds": uptime(d),
        "socket_path": d.socket_path,
        "queue_depth": d.device.queue_depth,
        "total_lru_evictions": d.registry.total_evictions,
        "queue_by_class": d.device.queue.depth_by_class(),
        "queue_by_client": d.device.queue.depth_by_client(),
        "connections": len(d.sessions),
        "clients": [client.describe() for client in _listed_sessions(d, asker)],
        "clients_not_listed": max(0, len(d.sessions) - MAX_LISTED_CLIENTS),
        "runtime_broken_reason": d.runtime.broken_reason,
        "last_capacity_event_reason": reason,
        "last_capacity_event_model": model,
        "last_capacity_event_at": at,
        # Additions beyond v1:
        "version": __version__,
        "backend": d.runtime.backend.name,
        "hailort_version": d.runtime.backend.hailort_version,
        "genai_unavailable_reason": d.runtime.backend.genai_missing,
        "device_busy_with": d.device.busy_with,
        "last_error": d.last_error,
        "throttled": d.runtime.throttled,
        "runtime_faults": d.runtime.runtime_faults,
        "runtime_recoveries": d.runtime.runtime_recoveries,
        "batched_requests": d.device.batched_requests,
        "held_by_clients": d.admission.held(),
        **_loan(d),
    }


def _listed_sessions(d, asker) -> list:
    """At most MAX_LISTED_CLIENTS sessions: the asker's own first, then the
    oldest connection of each other uid, then the oldest of the rest. One
    uid's many connections cannot hide every other uid's."""
    listed = [asker] if asker is not None and asker.id in d.sessions else []
    uids = {session.peer.uid for session in listed}
    rest = []
    for session in d.sessions.values():
        if session is asker:
            continue
        if session.peer.uid not in uids and len(listed) < MAX_LISTED_CLIENTS:
            uids.add(session.peer.uid)
            listed.append(session)
        elif len(listed) + len(rest) < MAX_LISTED_CLIENTS:
            rest.append(session)
    return listed + rest[:MAX_LISTED_CLIENTS - len(listed)]


def _loan(d) -> dict:
    loan = d.runtime.loan
    return {"lent_to": loan.to if loan else None, "lent_since": loan.since if loan else None}


def device_status_payload(d) -> dict:
    identity = d.runtime.identity
    # As the earlier daemon: name is the file name, source "device_manager".
    networks = [{"name": os.path.basename(model["model_path"]), **model} for model in d.registry.snapshot]
    device = {
        "device_id": identity.device_id,
        "architecture": identity.architecture,
        "fw_version": identity.fw_version,
    }
    if d.runtime.temperature_c is not None:
        # Left out when unknown: the earlier daemon's web portal fails on a null.
        device["temperature_celsius"] = d.runtime.temperature_c
    return {
        "device": device,
        "networks": {
            "status": "ok" if d.runtime.vdevice is not None else "unavailable",
            "source": "device_manager",
            "network_count": len(networks),
            "networks": networks,
        },
        "uptime_seconds": uptime(d),
        "queue_depth": d.device.queue_depth,
        "backend": d.runtime.backend.name,
        "hailort_version": d.runtime.backend.hailort_version,
        "runtime_broken_reason": d.runtime.broken_reason,
        "runtime_faults": d.runtime.runtime_faults,
        "runtime_recoveries": d.runtime.runtime_recoveries,
        **_loan(d),
        "thermal": {
            "throttled": d.runtime.throttled,
            "limit_c": d.runtime.thermal.limit_c,
            "resume_c": d.runtime.thermal.resume_c,
            "temperature_celsius": d.runtime.temperature_c,
            "read_at": d.runtime.temperature_read_at,
        },
    }


def summary(d) -> str:
    """One line for systemd's STATUS=."""
    parts = [f"{len(d.registry.snapshot)} model(s) loaded", f"queue {d.device.queue_depth}"]
    if d.runtime.loan is not None:
        parts.append(f"device lent to {d.runtime.loan.to}")
    elif d.runtime.broken_reason:
        parts.append(f"device unavailable: {d.runtime.broken_reason}")
    elif d.runtime.throttled:
        celsius = d.runtime.temperature_c
        parts.append(f"overheated ({celsius:g} °C): refusing new work" if celsius is not None
                     else "overheated: refusing new work")
    elif d.last_error_code:
        # The code, not the text: the text may quote a client's values (status has it).
        parts.append(f"last error: {d.last_error_code}")
    return f"{d.runtime.backend.name} backend, " + ", ".join(parts)
