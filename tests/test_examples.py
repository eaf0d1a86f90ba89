"""The example service in examples/ runs as documented against the simulated daemon."""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from conftest import die_with_parent, env_with_src

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embedding_service.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, array: np.ndarray) -> tuple[int, dict]:
    body = io.BytesIO()
    np.save(body, array)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body.getvalue(), method="POST"), timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_the_example_service_answers_through_both_clients_and_maps_errors(start_daemon, model_dir):
    daemon = start_daemon()
    port = free_port()
    service = subprocess.Popen([sys.executable, str(EXAMPLE), "--model", str(model_dir / "net.hef"),
                                "--socket", daemon.socket_path, "--port", str(port)], env=env_with_src(),
                               stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    try:
        assert service.stdout.readline().strip() == "listening"
        base = f"http://127.0.0.1:{port}"
        image = np.random.default_rng(1).integers(0, 255, (224, 224, 3), dtype=np.uint8)
        status, pipelined = post(f"{base}/infer", image)
        assert status == 200
        assert post(f"{base}/infer-sync", image) == (200, pipelined)   # both clients, one answer
        status, refused = post(f"{base}/infer", np.zeros((3,), np.float64))
        assert status == 400 and refused["code"] == "bad_request"
        daemon.stop()
        try:
            urllib.request.urlopen(f"{base}/health", timeout=30)
            raise AssertionError("healthy without a daemon")
        except urllib.error.HTTPError as error:
            assert error.code == 503
    finally:
        service.terminate()
        service.wait(10)
