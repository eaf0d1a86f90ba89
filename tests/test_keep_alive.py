"""keep_alive: idle models unloaded by the device thread, per type and per request.

No timing assertions: tests wait (with deadlines) for an unload to happen,
and check that models which must stay are still there once others left.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from hailo_devmgr.wire import protocol as p
from hailo_devmgr.daemon.actions import keep_alive_seconds
from hailo_devmgr.client import Client, tensor
from handler_checks import refused
from test_daemon_models import loaded_paths, wait_until

IMAGE = {"inputs": {"input_layer1": tensor(np.zeros((224, 224, 3), np.uint8))}}


def models_of(client) -> dict:
    return {model["model_path"]: model for model in client.status()["loaded_models"]}


def test_request_keep_alive_zero_unloads_right_after_use(start_daemon, model_dir):
    path, other = str(model_dir / "net.hef"), str(model_dir / "other.hef")
    daemon = start_daemon()
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(other, "generic")  # configured default: forever
        response = client.infer(path, IMAGE, "generic", keep_alive=0)
        assert response["result"]["outputs"]["output_layer1"].shape == (512,)
        wait_until(lambda: path not in loaded_paths(client), what="the keep_alive 0 unload")
        assert loaded_paths(client) == [other]
        assert models_of(client)[other]["keep_alive_s"] is None  # -1: forever
    # The unload line carries the fields of the request whose keep_alive chose it.
    [line] = [line for line in daemon.log().splitlines() if f"unloaded generic:{path}: idle for" in line]
    assert f"CLIENT_UID={os.getuid()}" in line and f"CLIENT_PID={os.getpid()}" in line


def test_configured_keep_alive_per_type_and_pins_are_never_unloaded(start_daemon, model_dir):
    pinned, short, clip = (str(model_dir / name) for name in ("net.hef", "other.hef", "two.hef"))
    daemon = start_daemon(keep_alive={"default": 0.3, "clip": -1},
                          pin=[{"model_type": "generic", "model_path": pinned}])
    with Client(daemon.socket_path, timeout=30) as client:
        wait_until(lambda: pinned in loaded_paths(client), what="the pinned model")
        client.load_model(clip, "clip")
        client.load_model(short, "generic")
        entry = models_of(client)[short]
        assert entry["keep_alive_s"] == 0.3 and entry["expires_at"] > entry["loaded_at"]
        wait_until(lambda: short not in loaded_paths(client), what="the default keep_alive to run out")
        # By then the pinned model and the clip model (-1 for its type) are still loaded.
        assert sorted(loaded_paths(client)) == sorted([pinned, clip])
        assert models_of(client)[pinned]["keep_alive_s"] is None
        assert models_of(client)[clip]["expires_at"] is None


def test_a_request_keep_alive_overrides_the_configured_one(start_daemon, model_dir):
    path, keeper = str(model_dir / "net.hef"), str(model_dir / "other.hef")
    daemon = start_daemon(keep_alive={"default": 0})
    with Client(daemon.socket_path, timeout=30) as client:
        client.request("load_model", model_type="generic", model_path=keeper, keep_alive=-1)
        client.load_model(path, "generic", keep_alive="10m")
        assert models_of(client)[path]["keep_alive_s"] == 600
        # A later request without keep_alive falls back to the configured 0.
        client.request("infer", model_type="generic", model_path=path, input_data=IMAGE)
        wait_until(lambda: path not in loaded_paths(client), what="the unload")
        assert loaded_paths(client) == [keeper]


@pytest.mark.parametrize("value, seconds", [
    (None, None), (0, 0.0), (-1, -1.0), (2.5, 2.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
    ("-1", -1.0), ("250ms", 0.25), ("90", 90.0),
])
def test_keep_alive_forms(value, seconds):
    assert keep_alive_seconds({} if value is None else {"keep_alive": value}) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", True, [], {}, "m"])
def test_bad_keep_alive_is_a_bad_request(client, model_dir, value):
    error = refused(lambda: client.request("load_model", model_type="generic",
                                           model_path=str(model_dir / "net.hef"), keep_alive=value))
    assert error.message.startswith("keep_alive must be a number of seconds")
    assert client.status()["loaded_models"] == []
    assert error.code == p.BAD_REQUEST
