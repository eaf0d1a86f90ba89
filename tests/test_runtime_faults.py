"""Runtime faults, capacity and heat, injected into a running daemon.

Faults and temperatures reach the simulated accelerator of the real
process through the `simulate` action (root or the daemon's own user
only; see src/hailo_devmgr/daemon/simulate.py). Every wait has a deadline; no
assertion depends on how long anything took.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

from hailo_devmgr.daemon import hailort_status as hs
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.daemon import simulate
from hailo_devmgr.daemon.backends.simulated import SimulatedBackend
from hailo_devmgr.daemon.config import DeviceConfig, SimulatedConfig
from hailo_devmgr.client import Client, DeviceError, tensor
from handler_checks import refused
from test_daemon_models import loaded_paths, wait_until

IMAGE = {"inputs": {"input_layer1": tensor(np.zeros((224, 224, 3), np.uint8))}}
FAST = {"thermal": {"interval_s": 0.1}, "device": {"rebuild_backoff_s": 0.1, "rebuild_backoff_max_s": 0.2}}


def infer(client, path, **fields):
    return client.request("infer", model_type="generic", model_path=path, input_data=IMAGE, **fields)


def in_background(function):
    """Run ``function`` in a thread; returns a getter for its result (or exception)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except Exception as exc:  # handed to the test
            outcome["error"] = exc
    thread = threading.Thread(target=run)
    thread.start()

    def result(timeout=30):
        thread.join(timeout)
        assert not thread.is_alive(), "the request never finished"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]
    return result


# ------------------------------------------------------------------ device lost

def test_device_lost_mid_inference_fails_that_request_then_recovers_with_pins(start_daemon, model_dir):
    pinned, other = str(model_dir / "net.hef"), str(model_dir / "other.hef")
    daemon = start_daemon(pin=[{"model_type": "generic", "model_path": pinned}], **FAST)
    with Client(daemon.socket_path, timeout=30) as client, Client(daemon.socket_path, timeout=30) as worker:
        wait_until(lambda: pinned in loaded_paths(client), what="the pinned model to load")
        client.load_model(other, "generic")
        # The inference hangs inside HailoRT; the device is lost meanwhile.
        client.request("simulate", fault={"kind": "hang"})
        pending = in_background(lambda: infer(worker, other, request_id="victim"))
        wait_until(lambda: (client.status()["device_busy_with"] or "").startswith("infer"), what="the hang")
        client.request("simulate", fault={"kind": "lose_device"}, release_hang=True)
        with pytest.raises(DeviceError) as info:
            pending()
        assert info.value.code == p.DEVICE_UNAVAILABLE
        assert info.value.message.startswith("Inference failed: ")
        assert "HAILO_COMMUNICATION_CLOSED (62)" in info.value.message
        assert info.value.retry_after_ms is not None

        # Rebuilt on its own: the pinned model is back, the other one is not.
        wait_until(lambda: client.status()["runtime_recoveries"] == 1, what="the device rebuild")
        wait_until(lambda: pinned in loaded_paths(client), what="the pinned model to be reloaded")
        status = client.status()
        assert status["runtime_faults"] == 1 and status["runtime_broken_reason"] is None
        assert other not in loaded_paths(client)
        [model] = status["loaded_models"]
        assert model["pinned"] is True
        # The next requests work, on the pinned model and on demand.
        assert infer(client, pinned)["result"]["outputs"]["output_layer1"].shape == (512,)
        assert infer(client, other)["status"] == "ok"
    log = daemon.log()
    assert "device runtime broken" in log and "device rebuilt after the runtime fault" in log
    assert "reloaded pinned model generic:" in log


@pytest.mark.parametrize("status", sorted(hs.RUNTIME_BROKEN))
def test_every_runtime_broken_status_rebuilds_the_device(start_daemon, model_dir, status):
    path = str(model_dir / "net.hef")
    daemon = start_daemon(**FAST)
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(path, "generic")
        client.request("simulate", fault={"kind": "raise", "status": status})
        error = refused(lambda: infer(client, path), p.DEVICE_UNAVAILABLE)
        assert hs.NAMES[status] in error.message
        wait_until(lambda: client.status()["runtime_recoveries"] == 1, what="the rebuild")
        assert infer(client, path)["status"] == "ok"


def test_rebuild_retries_with_backoff_then_waits_for_requests(start_daemon, model_dir):
    path = str(model_dir / "net.hef")
    daemon = start_daemon(device={"rebuild_attempts": 3, "rebuild_backoff_s": 0.05, "retry_s": 0})
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(path, "generic")
        # The device is lost and the next 3 opens fail too: every attempt is used up.
        client.request("simulate", fault={"kind": "lose_device"})
        client.request("simulate", fault={"kind": "raise", "status": hs.DEVICE_NOT_CONNECTED, "count": 3})
        error = refused(lambda: infer(client, path), p.DEVICE_UNAVAILABLE)
        wait_until(lambda: "rebuilding failed 3 times" in (client.status()["runtime_broken_reason"] or ""),
                   what="three failed rebuild attempts")
        assert client.status()["runtime_recoveries"] == 0
        assert client.device_status()["networks"]["status"] == "unavailable"
        # After giving up, a request reopens the device (retry_s 0).
        assert infer(client, path)["status"] == "ok"
        status = client.status()
        assert status["runtime_broken_reason"] is None and status["runtime_faults"] == 1
    log = daemon.log()
    assert log.count("device rebuild attempt") == 2 and "giving up rebuilding the device after 3" in log
    assert error.message.startswith("Inference failed: ")


def test_requests_during_a_rebuild_wait_get_device_unavailable_with_retry_after(start_daemon, model_dir):
    path = str(model_dir / "net.hef")
    daemon = start_daemon(device={"rebuild_attempts": 2, "rebuild_backoff_s": 600})
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(path, "generic")
        # Lost; the immediate first rebuild attempt fails as well; the next is 600 s away.
        client.request("simulate", fault={"kind": "lose_device"})
        client.request("simulate", fault={"kind": "raise", "status": hs.DEVICE_NOT_CONNECTED})
        refused(lambda: infer(client, path), p.DEVICE_UNAVAILABLE)
        wait_until(lambda: "attempt 1 of 2 failed" in (client.status()["runtime_broken_reason"] or ""),
                   what="the first rebuild attempt to fail")
        error = refused(lambda: infer(client, path), p.DEVICE_UNAVAILABLE)
        assert error.message.startswith("Device unavailable: runtime fault: ")
        assert error.retry_after_ms > 0


# ------------------------------------------------------------------ capacity

def test_resource_exhausted_evicts_least_recently_used_first(start_daemon, model_dir):
    names = ["a.hef", "b.hef", "c.hef", "d.hef"]
    for name in names:
        (model_dir / name).write_text(f"network {name}\n")
    a, b, c, d = (str(model_dir / name) for name in names)
    daemon = start_daemon(simulated={"device_memory_mb": 3000, "model_memory_mb": 500})
    with Client(daemon.socket_path, timeout=30) as client:
        for path in (a, b, c):
            client.load_model(path, "generic")
        infer(client, a)   # use order now: b, c, a
        infer(client, c)   # now: b, a, c
        # Two HAILO_RESOURCE_EXHAUSTED in a row: two evictions, oldest use first.
        client.request("simulate", fault={"kind": "raise", "status": hs.RESOURCE_EXHAUSTED, "count": 2})
        assert client.load_model(d, "generic")["message"] == "Model loaded"
        assert loaded_paths(client) == [c, d]
        status = client.status()
        assert status["total_lru_evictions"] == 2
        assert status["last_capacity_event_model"] == a  # the last one evicted for d
        assert status["last_capacity_event_reason"] == (
            f"device memory exhausted (HAILO_RESOURCE_EXHAUSTED) while loading {os.path.basename(d)} (generic)")
    log = daemon.log()
    assert log.index(f"evicted generic:{b}") < log.index(f"evicted generic:{a}")


def test_resource_exhausted_with_nothing_to_evict_is_answered(start_daemon, model_dir):
    path = str(model_dir / "net.hef")
    daemon = start_daemon()
    with Client(daemon.socket_path, timeout=30) as client:
        client.request("simulate", fault={"kind": "raise", "status": hs.RESOURCE_EXHAUSTED})
        error = refused(lambda: client.load_model(path, "generic"), p.RESOURCE_EXHAUSTED)
        assert error.message.startswith("Failed to load model: ")
        assert client.status()["runtime_faults"] == 0  # capacity, not a broken runtime


def test_open_file_failure_names_the_user_and_group(start_daemon, model_dir):
    daemon = start_daemon()
    with Client(daemon.socket_path, timeout=30) as client:
        client.request("simulate", fault={"kind": "raise", "status": hs.OPEN_FILE_FAILURE})
        error = refused(lambda: client.load_model(str(model_dir / "net.hef"), "generic"), p.LOAD_FAILED)
        assert "HAILO_OPEN_FILE_FAILURE" in error.message
        assert "the daemon's user (hailo-device-mgr) cannot read the file" in error.message
        assert "group hailo" in error.message


# ------------------------------------------------------------------ heat

def test_overheated_chip_refuses_new_work_until_it_cools(start_daemon, model_dir):
    path = str(model_dir / "net.hef")
    daemon = start_daemon(thermal={"limit_c": 80, "resume_c": 75, "interval_s": 0.1})
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(path, "generic")
        client.request("simulate", temperature_c=85)
        wait_until(lambda: client.device_status()["thermal"]["throttled"], what="the thermal guard")
        thermal = client.device_status()["thermal"]
        assert (thermal["limit_c"], thermal["resume_c"], thermal["temperature_celsius"]) == (80, 75, 85)
        assert client.device_status()["device"]["temperature_celsius"] == 85
        assert client.status()["throttled"] is True
        for call in (lambda: infer(client, path), lambda: client.load_model(str(model_dir / "other.hef"),
                                                                            "generic")):
            error = refused(call, p.OVERHEATED)
            assert error.retry_after_ms >= 100
            assert "85.0 °C" in error.message and "below 75" in error.message
        assert client.ping()["status"] == "ok"  # the control plane still answers
        # Between the two limits it stays refused (hysteresis)...
        client.request("simulate", temperature_c=78)
        wait_until(lambda: client.device_status()["thermal"]["temperature_celsius"] == 78, what="a new reading")
        refused(lambda: infer(client, path), p.OVERHEATED)
        # ...and below resume_c work is accepted again.
        client.request("simulate", temperature_c=70)
        wait_until(lambda: not client.device_status()["thermal"]["throttled"], what="the chip to cool")
        assert infer(client, path)["status"] == "ok"
        assert client.unload_model(path, "generic")["message"] == "Model unloaded"
    log = daemon.log()
    assert "refusing new device work" in log and "accepting device work again" in log


def test_unload_is_allowed_while_overheated(start_daemon, model_dir):
    path = str(model_dir / "net.hef")
    daemon = start_daemon(thermal={"interval_s": 0.1})
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(path, "generic")
        client.request("simulate", temperature_c=120)
        wait_until(lambda: client.status()["throttled"], what="the thermal guard")
        assert client.unload_model(path, "generic")["message"] == "Model unloaded"


# ------------------------------------------------------------------ hangs

def test_a_hung_call_keeps_the_control_plane_answering_until_released(start_daemon, model_dir):
    path = str(model_dir / "net.hef")
    daemon = start_daemon()
    with Client(daemon.socket_path, timeout=30) as client, Client(daemon.socket_path, timeout=30) as worker:
        client.load_model(path, "generic")
        client.request("simulate", fault={"kind": "hang"})
        pending = in_background(lambda: infer(worker, path))
        wait_until(lambda: (client.status()["device_busy_with"] or "").startswith("infer"), what="the hang")
        assert client.device_status()["status"] == "ok"
        client.request("simulate", release_hang=True)
        assert pending()["status"] == "ok"
        assert client.status()["device_busy_with"] is None


# ------------------------------------------------------------------ the simulate action

def test_simulate_checks_its_fields(client):
    for fields, text in [
        ({}, "simulate needs at least one of"),
        ({"temperature_c": "hot"}, "temperature_c must be a number"),
        ({"temperature_c": 500}, "temperature_c must be <= 200"),
        ({"fault": "boom"}, "fault must be an object"),
        ({"fault": {"kind": "melt"}}, "fault.kind must be one of raise, hang, lose_device"),
        ({"fault": {"kind": "raise"}}, "fault.status is required"),
        ({"fault": {"kind": "hang", "count": 0}}, "fault.count must be >= 1"),
        ({"release_hang": "yes"}, "release_hang must be true"),
    ]:
        error = refused(lambda: client.request("simulate", **fields))
        assert text in error.message, (fields, error.message)
    assert client.request("simulate", clear_faults=True)["applied"] == ["clear_faults"]


def test_simulate_does_not_exist_on_the_real_backend(start_daemon):
    daemon = start_daemon(backend="hailo")
    with Client(daemon.socket_path, timeout=30) as client:
        error = refused(lambda: client.request("simulate", temperature_c=90), p.UNKNOWN_ACTION)
        assert error.message == "Unknown action: simulate"


def test_simulate_is_only_for_root_or_the_daemons_user(start_daemon, readable_src, model_dir):
    for uid in (0, 1234):
        assert SimulatedBackend.may_drive(uid, own_uid=1234)
    for uid in (None, 1000):
        assert not SimulatedBackend.may_drive(uid, own_uid=1234)
    stranger = os.geteuid() + 1 if os.geteuid() else 1000
    with pytest.raises(p.RequestError) as info:
        simulate.authorize(SimulatedBackend(SimulatedConfig(), DeviceConfig()), stranger)
    assert info.value.code == p.FORBIDDEN
    if os.geteuid() != 0:
        return  # only root can connect as another user; the rule itself is checked above
    # A socket another user can reach: the test's tmp_path is private to root.
    folder = tempfile.mkdtemp(prefix="hailo-devmgr-peer-")
    os.chmod(folder, 0o755)
    try:
        _refused_for_another_user(start_daemon(socket_mode="0666", socket_path=f"{folder}/device.sock"),
                                  readable_src, str(model_dir / "net.hef"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _refused_for_another_user(daemon, src: str, model: str):
    """The simulate action, and the knobs in model_params that hold the
    simulated device, as a member of group hailo would ask for them."""
    script = (
        "import os, sys; os.setgid(65534); os.setgroups([]); os.setuid(65534); sys.path.insert(0, sys.argv[2]);"
        "from hailo_devmgr.client import Client, DeviceError\n"
        "with Client(sys.argv[1], timeout=10) as c:\n"
        "    try: c.request('simulate', temperature_c=99)\n"
        "    except DeviceError as e: print(e.code, e.message)\n"
        "    try: c.request('infer', model_path=sys.argv[3], model_type='generic', input_data={'inputs': {}},\n"
        "                   model_params={'simulate_hang_ms': 600000})\n"
        "    except DeviceError as e: print(e.code, e.message)\n"
        "    print(c.device_status()['status'])")
    out = subprocess.run([sys.executable, "-c", script, daemon.socket_path, src, model], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "forbidden simulate is accepted only from root or the daemon's own user",
        "forbidden model_params.simulate_hang_ms is accepted only from root or the daemon's own user", "ok"]


# ------------------------------------------------------------------ no HailoRT here

def test_real_backend_without_hailort_starts_and_answers_device_unavailable(start_daemon, model_dir):
    daemon = start_daemon(backend="hailo")
    with Client(daemon.socket_path, timeout=30) as client:
        reason = client.status()["runtime_broken_reason"]
        assert "HailoRT Python package (hailo_platform) is not installed" in reason
        assert client.device_status()["runtime_broken_reason"] == reason
        for model_type in ("whisper", "ocr", "depth", "pose"):
            error = refused(lambda: client.load_model(str(model_dir / "net.hef"), model_type),
                            p.DEVICE_UNAVAILABLE)
            assert error.message.startswith("Device unavailable: HailoRT Python package")

