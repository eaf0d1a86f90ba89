"""The event loop and the device thread share one CPU; other threads keep every CPU."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from hailo_devmgr.daemon import config as config_mod
from hailo_devmgr.daemon.cpu_affinity import CpuPlacement
from wire import Raw

ALLOWED = frozenset(os.sched_getaffinity(0))
several_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs a process allowed two CPUs or more")


def test_auto_takes_the_highest_allowed_cpu_and_off_or_one_cpu_pins_nothing():
    assert CpuPlacement.choose("auto", {0, 1, 2, 3}).cpu == 3
    assert CpuPlacement.choose("auto", {0, 2, 5}).cpu == 5
    assert CpuPlacement.choose(2, {0, 1, 2, 3}).cpu == 2
    assert CpuPlacement.choose("off", {0, 1, 2, 3}).cpu is None
    assert CpuPlacement.choose("auto", {1}).cpu is None    # nothing to gain, nothing to confine
    assert CpuPlacement.choose("auto", {0, 1, 2, 5}).describe() == "CPU 5 of CPUs 0-2,5"


def test_a_cpu_the_process_may_not_use_is_refused():
    with pytest.raises(ValueError, match="CPU 7 is not one this process may run on"):
        CpuPlacement.choose(7, {0, 1, 2, 3})


@pytest.mark.parametrize("value", ["fast", -1, True, 1.5, "3"])
def test_config_refuses_what_is_not_auto_off_or_a_cpu_number(tmp_path, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"cpu_affinity: {value!r}\n" if isinstance(value, str) else f"cpu_affinity: {value}\n")
    with pytest.raises(config_mod.ConfigError, match="cpu_affinity"):
        config_mod.load(str(path))


def test_config_refuses_a_cpu_this_machine_does_not_allow(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"cpu_affinity: {max(ALLOWED) + 1}\n")
    with pytest.raises(config_mod.ConfigError, match="not one this process may run on"):
        config_mod.load(str(path))


@several_cpus
def test_a_pinned_thread_widens_while_it_makes_threads_that_must_run_anywhere():
    placement = CpuPlacement.choose("auto")
    seen = {}

    def pinned_thread():
        placement.pin_here()
        seen["pinned"] = os.sched_getaffinity(0)
        with placement.widened():
            seen["widened"] = os.sched_getaffinity(0)
            child = threading.Thread(target=lambda: seen.setdefault("child", os.sched_getaffinity(0)))
            child.start()
            child.join()
        seen["after"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=pinned_thread)
    thread.start()
    thread.join()
    assert seen["pinned"] == seen["after"] == {max(ALLOWED)}
    assert seen["widened"] == seen["child"] == ALLOWED


def _thread_cpus(pid: int) -> dict[int, str]:
    """Each thread of ``pid`` -> its Cpus_allowed_list."""
    masks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                masks[int(tid)] = line.split(":", 1)[1].strip()
    return masks


def _ready_line(daemon) -> str:
    """The daemon's "ready" log line (the socket accepts before it is written:
    clients wait in the backlog while the device opens)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in daemon.log().splitlines():
            if " ready on " in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no ready line in the log:\n{daemon.log()[-2000:]}")


def _allowed_list() -> str:
    return CpuPlacement.choose("auto").describe().split("of CPUs ", 1)[1]


@several_cpus
def test_daemon_pins_its_loop_and_device_thread_and_leaves_workers_free(start_daemon):
    daemon = start_daemon()
    pid = daemon.process.pid
    raw = Raw(daemon.socket_path)
    # A body over the inline bound is parsed in the worker pool: a worker thread exists after it.
    raw.send({"action": "ping", "request_id": "big", "padding": "x" * (300 * 1024)})
    assert raw.read()["request_id"] == "big"
    raw.close()
    masks = _thread_cpus(pid)
    cpu = str(max(ALLOWED))
    assert masks[pid] == cpu                                   # the event loop (the main thread)
    assert sum(mask == cpu for mask in masks.values()) >= 2    # and the device thread
    assert _allowed_list() in masks.values()                   # the worker that parsed the body
    assert f"event loop and device thread: CPU {cpu} of CPUs" in _ready_line(daemon)


@several_cpus
def test_off_pins_no_thread(start_daemon):
    daemon = start_daemon(cpu_affinity="off")
    masks = _thread_cpus(daemon.process.pid)
    assert set(masks.values()) == {_allowed_list()}
    assert "event loop and device thread: not pinned" in _ready_line(daemon)
