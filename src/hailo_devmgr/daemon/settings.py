"""The running configuration: one frozen :class:`config.Config`, replaced whole on reload.

Every part of the daemon that obeys a setting reads ``settings.config`` when
it uses it, and keeps no copy: a reload (SIGHUP) is one assignment, so no
part ever works from a mix of the old file and the new one, and a setting
added later takes effect on reload without anyone copying it along.

What a part has built from a setting (the admission pools' bounds, the
device queue's bounds, the registry's pinned models) is rebuilt from the
new object by the watchers the part registered (:meth:`Settings.watch`).

Settings that need a restart (the backend, the socket, the device, the
simulated device, the scheduling policy, the CPU affinity) keep their running values in the
object that replaces the old one: what ``settings.config`` says is what is
in effect.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from .config import Config

# Taken only at start: the socket is bound, the backend and device opened,
# the queue's policy built, the threads placed.
RESTART_ONLY = ("backend", "socket_path", "socket_mode", "socket_dir_mode", "simulated", "device",
                "cpu_affinity")


class Settings:
    def __init__(self, config: Config):
        self.config = config
        self._watchers: list[Callable[[], None]] = []
        self._derived: dict = {}   # make -> (the config it was made from, what it made)

    def watch(self, rebuild: Callable[[], None]) -> None:
        """Call ``rebuild`` (no arguments: it reads ``self.config``) after each reload."""
        self._watchers.append(rebuild)

    def derived(self, make: Callable[[Config], Any]) -> Any:
        """``make(self.config)``, made once per configuration (any thread)."""
        config = self.config
        made = self._derived.get(make)
        if made is None or made[0] is not config:
            made = self._derived[make] = (config, make(config))
        return made[1]

    def replace(self, new: Config) -> list[str]:
        """Put ``new`` in effect (the event loop's thread); returns the names
        of its changes that wait for a restart (their running values stay)."""
        new, waiting = _kept_until_restart(self.config, new)
        self.config = new
        for rebuild in self._watchers:
            rebuild()
        return waiting


def _kept_until_restart(old: Config, new: Config) -> tuple[Config, list[str]]:
    waiting = [key for key in RESTART_ONLY if getattr(new, key) != getattr(old, key)]
    kept = {key: getattr(old, key) for key in waiting}
    if new.scheduling.policy != old.scheduling.policy:
        waiting.append("scheduling.policy")
        kept["scheduling"] = replace(new.scheduling, policy=old.scheduling.policy)
    return (replace(new, **kept) if kept else new), waiting


def pin_keys(config: Config) -> frozenset[str]:
    """The pinned models, as the registry names them ("type:path")."""
    return frozenset(f"{pin.model_type}:{pin.model_path}" for pin in config.pin)


def bytes_per_uid(config: Config) -> int:
    """A uid's share of request bytes, never below one whole message: a body is
    charged a chunk at a time, and its own earlier chunks count."""
    return max(config.max_pending_bytes_per_uid, config.max_message_bytes)
