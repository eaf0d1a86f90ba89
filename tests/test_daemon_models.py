"""Model cache behaviour through the socket: pins, LRU eviction, device ownership, many clients."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from hailo_devmgr.wire import protocol as p
from hailo_devmgr.client import Client, DeviceError, tensor


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def loaded_paths(client) -> list[str]:
    return [model["model_path"] for model in client.status()["loaded_models"]]


def test_max_loaded_models_evicts_least_recently_used(start_daemon, model_dir):
    daemon = start_daemon(max_loaded_models=2)
    a, b, c = (str(model_dir / name) for name in ("net.hef", "other.hef", "two.hef"))
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(a, "generic")
        client.load_model(b, "generic")
        client.infer(a, {"inputs": {"input_layer1": tensor(np.zeros((224, 224, 3), np.uint8))}}, "generic")
        client.load_model(c, "generic")  # b is now the least recently used
        assert sorted(loaded_paths(client)) == sorted([a, c])
        status = client.status()
        assert status["total_lru_evictions"] == 1
        # As the earlier daemon: the model evicted, and the one being loaded in the reason.
        assert status["last_capacity_event_model"] == b
        assert status["last_capacity_event_reason"] == "max_loaded_models (2) reached while loading two.hef (generic)"
        assert status["last_capacity_event_at"] > 0


def test_device_memory_exhaustion_evicts_and_retries(start_daemon, model_dir):
    daemon = start_daemon(simulated={"device_memory_mb": 1000, "model_memory_mb": 400})
    a, b, c = (str(model_dir / name) for name in ("net.hef", "other.hef", "vlm.hef"))
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(a, "generic")
        client.load_model(b, "generic")
        assert client.load_model(c, "generic")["message"] == "Model loaded"
        assert sorted(loaded_paths(client)) == sorted([b, c])
        status = client.status()
        assert status["total_lru_evictions"] == 1
        assert "RESOURCE_EXHAUSTED" in status["last_capacity_event_reason"]


def test_pinned_models_are_prewarmed_and_never_evicted(start_daemon, model_dir):
    pinned = str(model_dir / "net.hef")
    daemon = start_daemon(max_loaded_models=2, pin=[{"model_type": "generic", "model_path": pinned}])
    with Client(daemon.socket_path, timeout=30) as client:
        wait_until(lambda: pinned in loaded_paths(client), what="pinned model to load")
        [model] = client.status()["loaded_models"]
        assert model["pinned"] is True
        for name in ("other.hef", "two.hef", "vlm.hef"):
            client.load_model(str(model_dir / name), "generic")
        assert pinned in loaded_paths(client)
        assert client.status()["total_lru_evictions"] == 2
        with pytest.raises(DeviceError) as info:
            client.unload_model(pinned, "generic")
        assert info.value.code == p.FORBIDDEN and "pinned" in info.value.message


def test_everything_pinned_means_resource_exhausted(start_daemon, model_dir):
    pinned = str(model_dir / "net.hef")
    daemon = start_daemon(max_loaded_models=1, pin=[{"model_type": "generic", "model_path": pinned}])
    with Client(daemon.socket_path, timeout=30) as client:
        wait_until(lambda: pinned in loaded_paths(client), what="pinned model to load")
        with pytest.raises(DeviceError) as info:
            client.load_model(str(model_dir / "other.hef"), "generic")
        assert info.value.code == p.RESOURCE_EXHAUSTED
        assert info.value.message.startswith("Failed to load model: ")


def test_second_daemon_cannot_own_the_device_but_still_answers(start_daemon, tmp_path, model_dir):
    first = start_daemon()
    from conftest import DaemonProcess, write_config
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    config = write_config(second_dir, model_dir,
                          simulated={"load_ms": 5, "infer_ms": 1, "lock_path": str(tmp_path / "device.lock")})
    second = DaemonProcess(second_dir, config, str(second_dir / "sock" / "device.sock")).wait_ready()
    try:
        with Client(second.socket_path, timeout=30) as client:
            status = client.status()
            assert "owned by another process" in status["runtime_broken_reason"]
            with pytest.raises(DeviceError) as info:
                client.load_model(str(model_dir / "net.hef"), "generic")
            assert info.value.code == p.DEVICE_UNAVAILABLE
        with Client(first.socket_path, timeout=30) as client:
            assert client.load_model(str(model_dir / "net.hef"), "generic")["status"] == "ok"
    finally:
        second.stop()


def test_32_clients_interleaving_get_only_their_own_answers(start_daemon, model_dir):
    daemon = start_daemon(max_loaded_models=2, simulated={"load_ms": 2, "infer_ms": 0})
    paths = [str(model_dir / name) for name in ("net.hef", "other.hef", "two.hef")]
    inputs = {i: np.full((224, 224, 3), i, np.uint8) for i in range(32)}
    with Client(daemon.socket_path, timeout=60) as reference:
        expected = {(path, i): reference.infer(path, {"inputs": {"input_layer1": tensor(inputs[i])}},
                                               "generic")["result"]["outputs"]["output_layer1"]
                    for path in paths[:2] for i in range(32)}
    failures: list[str] = []

    def worker(i: int):
        try:
            with Client(daemon.socket_path, timeout=60) as client:
                for round_ in range(6):
                    path = paths[(i + round_) % 2]
                    if round_ % 3 == 0:
                        client.load_model(paths[2], "generic")  # loads force evictions between clients
                    response = client.request(
                        "infer", model_path=path, model_type="generic",
                        input_data={"inputs": {"input_layer1": tensor(inputs[i])}})
                    output = response["result"]["outputs"]["output_layer1"]
                    if not np.array_equal(output, expected[(path, i)]):
                        failures.append(f"client {i} round {round_}: crossed result")
        except Exception as exc:  # collected, so one failure does not hide others
            failures.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    with Client(daemon.socket_path, timeout=10) as client:
        status = client.status()
        assert status["queue_depth"] == 0 and status["total_lru_evictions"] > 0
