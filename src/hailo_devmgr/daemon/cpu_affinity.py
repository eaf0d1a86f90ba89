"""Where the daemon's two Python threads run: on one CPU, which they share.

The event loop and the device thread take turns under the GIL: at most one
of them runs Python at any moment, so a second core gains them nothing.
On two cores, each turn wakes the other core and moves the request's
objects from one core's caches to the other's. With 8 client processes
sending small infers to a 2-core machine, both threads on one CPU used
150-160 µs of CPU per request instead of 200-210 µs, and answered 30-40 %
more requests per second (bench/small_requests.py). Pinning the event loop
alone gained nothing.

Threads that work for long stretches without the GIL keep every allowed
CPU. These are the ones another core helps:
- the worker pool's threads (copies, mappings, large decodes);
- HailoRT's own threads. They are made when the device opens and when a
  model loads, so the device thread widens its mask for those calls and
  the new threads inherit the wide mask.

The setting ``cpu_affinity`` (config.py) picks the CPU:
- ``auto``: the highest-numbered CPU the process may use (CPU 0 takes
  most interrupts on a Raspberry Pi);
- a CPU number;
- ``off``: no pinning.
A process allowed only one CPU is not pinned.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

log = logging.getLogger(__name__)


def allowed_cpus() -> frozenset[int]:
    """The CPUs this process may run on (its cgroup's and systemd's CPUAffinity=)."""
    return frozenset(os.sched_getaffinity(0))


class CpuPlacement:
    """One CPU for the event loop and the device thread (None: no pinning)."""

    def __init__(self, cpu: int | None = None, allowed: frozenset[int] = frozenset()):
        self.cpu = cpu
        self.allowed = allowed

    @classmethod
    def choose(cls, setting: str | int, allowed: frozenset[int] | None = None) -> "CpuPlacement":
        """From the ``cpu_affinity`` setting; ValueError for a CPU the process may not use."""
        allowed = allowed_cpus() if allowed is None else frozenset(allowed)
        if setting == "off" or len(allowed) < 2:
            return cls(None, allowed)
        if setting == "auto":
            return cls(max(allowed), allowed)
        if setting not in allowed:
            raise ValueError(f"CPU {setting} is not one this process may run on ({_ranges(allowed)})")
        return cls(setting, allowed)

    def describe(self) -> str:
        if self.cpu is None:
            return "not pinned"
        return f"CPU {self.cpu} of {_ranges(self.allowed)}"

    def pin_here(self) -> None:
        """The calling thread (and the threads it makes from now on) on the chosen CPU."""
        if self.cpu is not None:
            _set_mask({self.cpu})

    def unpin_here(self) -> None:
        """The calling thread on every allowed CPU (a worker made by a pinned thread)."""
        if self.cpu is not None:
            _set_mask(self.allowed)

    @contextlib.contextmanager
    def widened(self) -> Iterator[None]:
        """The pinned calling thread on every allowed CPU for the block:
        threads made meanwhile (HailoRT's, when the device opens or a model
        loads) are not confined to the daemon's CPU."""
        if self.cpu is None:
            yield
            return
        _set_mask(self.allowed)
        try:
            yield
        finally:
            _set_mask({self.cpu})


def _set_mask(cpus) -> None:
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:   # a cpuset changed under us: run where the kernel lets us
        log.warning("could not set the CPU affinity to %s: %s", _ranges(cpus), exc)


def _ranges(cpus) -> str:
    """``{0, 1, 2, 5}`` -> ``"CPUs 0-2,5"``."""
    spans: list[list[int]] = []
    for cpu in sorted(cpus):
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"CPUs {text}"
