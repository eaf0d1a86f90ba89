"""The watchdog budgets each phase of a device job on its own (issue 21, point 6).

An infer that loads its model on demand is a load (load_budget_s) and then
an inference (infer_budget_s): a hung inference is over budget once it has
run infer_budget_s, not load_budget_s + infer_budget_s after the job began.
"""
from __future__ import annotations

import time

import numpy as np

from hailo_devmgr.wire import protocol as p
from hailo_devmgr.client import Client, tensor

INPUT = {"inputs": {"input_layer1": tensor(np.zeros((224, 224, 3), np.uint8))}}


def wait_for_line(daemon, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in daemon.log().splitlines():
            if text in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in the log:\n{daemon.log()[-3000:]}")


def test_a_hung_inference_after_a_load_on_demand_has_the_infer_budget_alone(start_daemon, model_dir):
    # A load budget far longer than the test's wait: were it added to the
    # infer budget, the hang would not be reported within the wait.
    daemon = start_daemon(env={"WATCHDOG_USEC": "200000"},
                          watchdog={"load_budget_s": 60, "infer_budget_s": 1})
    hung = Client(daemon.socket_path, timeout=30).connect()
    hung._sock.sendall(p.encode_frame({
        "action": "infer", "model_type": "generic", "model_path": str(model_dir / "net.hef"),
        "model_params": {"simulate_hang_ms": 8000}, "input_data": INPUT}))
    try:
        line = wait_for_line(daemon, "withholding watchdog pings")
    finally:
        hung.close()
    assert "device operation infer generic:" in line and "over its 1 s budget" in line, line


def test_a_slow_load_on_demand_has_the_load_budget(start_daemon, model_dir):
    """The load phase of an infer is not held to the (shorter) infer budget."""
    daemon = start_daemon(env={"WATCHDOG_USEC": "200000"}, simulated={"load_ms": 1500},
                          watchdog={"load_budget_s": 30, "infer_budget_s": 0.5})
    with Client(daemon.socket_path, timeout=30) as client:
        answer = client.infer(str(model_dir / "net.hef"), INPUT, "generic")
    assert answer["status"] == "ok"
    assert "withholding watchdog pings" not in daemon.log()
