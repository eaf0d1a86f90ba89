"""Model files through a running daemon: swaps cannot escape, descriptors do not leak.

The daemon opens each model file once on its device thread and hands
HailoRT ``/proc/self/fd/N``; these tests watch the daemon process's own
``/proc/<pid>/fd`` while clients load, infer, unload and send bad requests.
"""
from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest
import yaml

from hailo_devmgr.wire import protocol as p
from hailo_devmgr.client import Client, DeviceError, tensor

# Same input, different output names: a result tells which file was read.
INSIDE_NET = {"inputs": [{"name": "x", "shape": [4], "format": "UINT8"}],
              "outputs": [{"name": "inside_out", "shape": [4], "format": "FLOAT32"}]}
SECRET_NET = {"inputs": [{"name": "x", "shape": [4], "format": "UINT8"}],
              "outputs": [{"name": "secret_out", "shape": [4], "format": "FLOAT32"}]}
X = {"inputs": {"x": tensor(np.arange(4, dtype=np.uint8))}}


def fds_of(pid: int) -> dict[str, str]:
    """The daemon's open descriptors: number → what it points at."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[name] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:  # closed while we looked
            pass
    return found


def model_fds(pid: int, folder) -> list[str]:
    return sorted(target for target in fds_of(pid).values() if target.startswith(str(folder)))


def settle(pid: int, expected: int, timeout: float = 10.0) -> int:
    """The daemon's descriptor count once it stops moving towards ``expected``.

    A connection a client closed is closed by the daemon's event loop a
    moment later; waiting (with a deadline) is not a timing assertion."""
    deadline = time.monotonic() + timeout
    count = len(fds_of(pid))
    while count != expected and time.monotonic() < deadline:
        time.sleep(0.02)
        count = len(fds_of(pid))
    return count


def code_of(call) -> str:
    with pytest.raises(DeviceError) as info:
        call()
    return info.value.code


def test_loaded_models_hold_one_descriptor_per_file_until_released(start_daemon, model_dir):
    daemon = start_daemon(max_loaded_models=2)
    pid = daemon.process.pid
    net, other, two = (str(model_dir / name) for name in ("net.hef", "other.hef", "two.hef"))
    text = str(model_dir / "clip_text.hef")
    with Client(daemon.socket_path, timeout=30) as client:
        client.ping()
        assert model_fds(pid, model_dir) == []
        client.load_model(net, "clip", model_params={"text_hef_path": text})
        assert model_fds(pid, model_dir) == sorted([net, text])  # the HEF and the text encoder
        client.load_model(other, "generic")
        client.load_model(two, "generic")  # evicts the clip model: its two descriptors go with it
        assert model_fds(pid, model_dir) == sorted([other, two])
        client.unload_model(other, "generic")
        client.unload_model(two, "generic")
        assert model_fds(pid, model_dir) == []


def test_no_descriptor_leaks_over_many_loads_unloads_and_bad_requests(start_daemon, model_dir):
    daemon = start_daemon(max_loaded_models=2)
    pid = daemon.process.pid
    (model_dir / "unfit.hef").write_text(yaml.safe_dump({  # loads, but depth needs one output
        "inputs": [{"name": "in", "shape": [4], "format": "UINT8"}],
        "outputs": [{"name": "a", "shape": [1], "format": "FLOAT32"},
                    {"name": "b", "shape": [1], "format": "FLOAT32"}]}))
    (model_dir / "small.hef").write_text(yaml.safe_dump(INSIDE_NET))
    net, other, small = (str(model_dir / name) for name in ("net.hef", "other.hef", "small.hef"))
    with Client(daemon.socket_path, timeout=30) as client:
        client.ping()
        baseline = len(fds_of(pid))
        for round_ in range(25):
            client.load_model(net, "generic")
            client.load_model(other, "clip", model_params={"text_hef_path": str(model_dir / "clip_text.hef")})
            client.infer(small, X, "generic")  # load on demand, evicting the LRU one
            assert code_of(lambda: client.load_model(str(model_dir / "empty.hef"), "generic")) == p.LOAD_FAILED
            assert code_of(lambda: client.load_model(str(model_dir / "unfit.hef"), "depth")) == p.LOAD_FAILED
            assert code_of(lambda: client.load_model(str(model_dir / "escape.hef"), "generic")) == p.FORBIDDEN
            assert code_of(lambda: client.load_model(str(model_dir / "gone.hef"), "generic")) == p.MODEL_NOT_FOUND
            assert code_of(lambda: client.load_model(
                net, "ocr", model_params={"recognition_hefs": {"en": str(model_dir / "escape.hef")}})) == p.FORBIDDEN
            assert code_of(lambda: client.infer(small, {"inputs": {"x": tensor(np.zeros(5, np.uint8))}},
                                                "generic")) == p.BAD_REQUEST
            assert code_of(lambda: client.request("infer", model_path=small, model_type="generic",
                                                  input_data={"inputs": {"x": {"dtype": "uint8"}}})) == p.BAD_REQUEST
            if round_ % 5 == 0:  # connections that end abruptly, mid-frame
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as brief:
                    brief.connect(daemon.socket_path)
                    brief.sendall(b"\x00\x00\x01\x00{\"act")
            for path, model_type in ((net, "generic"), (other, "clip"), (small, "generic")):
                client.unload_model(path, model_type)
        assert model_fds(pid, model_dir) == []
        assert settle(pid, baseline) == baseline, fds_of(pid)


def test_a_handler_error_names_the_file_not_its_descriptor(daemon, model_dir):
    (model_dir / "unfit.hef").write_text(yaml.safe_dump({
        "inputs": [{"name": "a", "shape": [4], "format": "UINT8"}, {"name": "b", "shape": [4], "format": "UINT8"}],
        "outputs": [{"name": "o", "shape": [1], "format": "FLOAT32"}]}))
    with Client(daemon.socket_path, timeout=30) as client:
        with pytest.raises(DeviceError) as info:
            client.load_model(str(model_dir / "unfit.hef"), "depth")
        assert f"the depth HEF {model_dir}/unfit.hef has 2 inputs" in info.value.message
        with pytest.raises(DeviceError) as info:
            client.load_model(str(model_dir / "empty.hef"), "generic")
        assert "/proc/self/fd" not in info.value.message and str(model_dir / "empty.hef") in info.value.message


def test_a_link_flipped_outside_while_requests_run_never_reaches_the_daemon(start_daemon, model_dir, tmp_path):
    """A member of group hailo flips a name in a model folder between an
    inside file and a link to a secret, as fast as it can, while loading it:
    the daemon must never read the secret (with a check by name only, the
    window between validation and HailoRT's open is wide open)."""
    daemon = start_daemon(simulated={"load_ms": 0, "infer_ms": 0})
    (model_dir / "inside.hef").write_text(yaml.safe_dump(INSIDE_NET))
    secret = tmp_path / "outside" / "secret_net.hef"
    secret.write_text(yaml.safe_dump(SECRET_NET))
    flip = model_dir / "flip.hef"
    stop = threading.Event()

    def flipper():
        staged = model_dir / ".flip-staging"
        while not stop.is_set():
            for target in (model_dir / "inside.hef", secret):
                try:
                    os.unlink(staged)
                except FileNotFoundError:
                    pass
                if target == secret:
                    os.symlink(secret, staged)
                else:
                    os.link(target, staged)  # a regular file inside: passes the check
                os.replace(staged, flip)

    outcome = {"inside": 0, "refused": 0, "secret": 0}
    thread = threading.Thread(target=flipper, daemon=True)
    os.link(model_dir / "inside.hef", flip)
    thread.start()
    try:
        with Client(daemon.socket_path, timeout=30) as client:
            for _ in range(300):
                try:
                    result = client.infer(str(flip), X, "generic")["result"]["outputs"]
                except DeviceError as error:
                    assert error.code in (p.FORBIDDEN, p.MODEL_NOT_FOUND), error
                    outcome["refused"] += 1
                    continue
                outcome["secret" if "secret_out" in result else "inside"] += 1
                client.unload_model(str(flip), "generic")
    finally:
        stop.set()
        thread.join(10)
    assert outcome["secret"] == 0, outcome
    assert outcome["inside"] > 0 and outcome["refused"] > 0, outcome  # both sides of the flip were seen


def test_a_device_rebuild_closes_every_model_file_and_reopens_only_the_pinned(start_daemon, model_dir):
    pinned, other = str(model_dir / "net.hef"), str(model_dir / "other.hef")
    text = str(model_dir / "clip_text.hef")
    daemon = start_daemon(pin=[{"model_type": "clip", "model_path": pinned,
                                "model_params": {"text_hef_path": text}}],
                          device={"rebuild_backoff_s": 0.1, "rebuild_backoff_max_s": 0.2})
    pid = daemon.process.pid
    with Client(daemon.socket_path, timeout=30) as client:
        wait_until(lambda: model_fds(pid, model_dir) == sorted([pinned, text]), "the pinned model's files")
        client.load_model(other, "generic")
        assert model_fds(pid, model_dir) == sorted([pinned, text, other])
        client.request("simulate", fault={"kind": "raise", "status": 62})  # HAILO_COMMUNICATION_CLOSED
        assert code_of(lambda: client.infer(other, {"inputs": {"input_layer1": tensor(
            np.zeros((224, 224, 3), np.uint8))}}, "generic")) == p.DEVICE_UNAVAILABLE
        wait_until(lambda: client.status()["runtime_recoveries"] == 1, "the device rebuild")
        wait_until(lambda: [m["model_path"] for m in client.status()["loaded_models"]] == [pinned],
                   "the pinned model to be reloaded")
        # Released with the old device, reopened once for the pin, nothing else.
        assert model_fds(pid, model_dir) == sorted([pinned, text])


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
