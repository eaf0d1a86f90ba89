"""hailo-devmgr-http: the status and metrics over HTTP, from a process of its own.

The process is started as users start it (``python3 -m hailo_devmgr.http``),
bound by hand or handed a TCP socket by ``systemd-socket-activate``; answers
are read with urllib, and the metrics text with prometheus_client's own
parser.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import die_with_parent, env_with_src
from hailo_devmgr.client import Client, tensor

# The keys the earlier daemon's /v1/device/status body has (its device_status).
PEER_DEVICE_STATUS_KEYS = {"device", "networks"}
PEER_DEVICE_KEYS = {"device_id", "architecture", "fw_version", "temperature_celsius"}
PEER_NETWORKS_KEYS = {"status", "source", "network_count", "networks"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def wait_http(url: str, process: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else "exited"
        try:
            get(url, timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.05)
    raise TimeoutError(url)


@pytest.fixture
def http_server(tmp_path):
    """Factory: http_server(device_socket, activated=False) -> base URL."""
    started = []

    def start(device_socket: str, activated: bool = False) -> str:
        port = free_port()
        argv = [sys.executable, "-m", "hailo_devmgr.http", "--device-socket", device_socket]
        if activated:
            argv = [shutil.which("systemd-socket-activate"), "-l", f"127.0.0.1:{port}", "-E", "PYTHONPATH",
                    *argv, "--listen-status", "127.0.0.1:1"]  # ignored: the socket comes from systemd
        else:
            argv += ["--listen-status", f"127.0.0.1:{port}"]
        process = subprocess.Popen(argv, env=env_with_src(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, preexec_fn=die_with_parent, text=True)
        started.append(process)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/metrics", process)
        return base

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


def test_device_status_is_the_daemons_with_the_peers_keys(daemon, http_server, model_dir):
    base = http_server(daemon.socket_path)
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(str(model_dir / "net.hef"), "generic")
        direct = client.device_status()
    code, headers, body = get(base + "/v1/device/status")
    assert code == 200 and headers["Content-Type"].startswith("application/json")
    answer = json.loads(body)
    assert PEER_DEVICE_STATUS_KEYS <= set(answer) and set(answer["device"]) == PEER_DEVICE_KEYS
    assert set(answer["networks"]) == PEER_NETWORKS_KEYS and answer["networks"]["source"] == "device_manager"
    [network] = answer["networks"]["networks"]
    assert network["name"] == "net.hef" and network["model_type"] == "generic"
    assert set(answer) == set(direct) - {"request_id"}
    assert answer["device"] == direct["device"]


def test_metrics_parse_with_prometheus_clients_own_parser(daemon, http_server, model_dir):
    base = http_server(daemon.socket_path)
    path = str(model_dir / "net.hef")
    with Client(daemon.socket_path, timeout=30) as client:
        for _ in range(3):
            client.infer(path, {"inputs": {"input_layer1": tensor(np.zeros((224, 224, 3), np.uint8))}}, "generic")
        with pytest.raises(Exception):
            client.infer(path, {"inputs": {}}, "generic")
    code, headers, body = get(base + "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in families.values() for sample in family.samples}
    assert samples[("hailo_devmgr_requests_total", (("action", "infer"), ("model_type", "generic")))] == 4
    assert samples[("hailo_devmgr_errors_total", (("code", "bad_request"), ("model_type", "generic")))] == 1
    assert families["hailo_devmgr_run_seconds"].type == "histogram"
    # The input names are checked on the device thread: that request ran too.
    assert samples[("hailo_devmgr_run_seconds_count", (("model_type", "generic"),))] == 4
    assert samples[("hailo_devmgr_queue_wait_seconds_bucket", (("le", "+Inf"), ("model_type", "generic")))] == 4
    assert samples[("hailo_devmgr_loaded_models", (("model_type", "generic"),))] == 1
    assert samples[("hailo_devmgr_device_temperature_celsius", ())] == 53.0
    for name in ("hailo_devmgr_queue_depth", "hailo_devmgr_evictions_total", "hailo_devmgr_runtime_faults_total",
                 "hailo_devmgr_runtime_recoveries_total", "hailo_devmgr_device_up"):
        assert (name, ()) in samples, name


def test_a_daemon_that_cannot_be_reached_is_503_with_the_reason(tmp_path, http_server):
    base = http_server(str(tmp_path / "nobody.sock"))
    for path in ("/v1/device/status", "/metrics"):
        code, _, body = get(base + path)
        assert code == 503
        answer = json.loads(body)
        assert answer["code"] == "device_unavailable" and "nobody.sock" in answer["error"]


def test_socket_activated_it_serves_on_the_socket_systemd_passed(daemon, http_server):
    base = http_server(daemon.socket_path, activated=True)
    code, _, body = get(base + "/v1/device/status")
    assert code == 200 and json.loads(body)["networks"]["source"] == "device_manager"
