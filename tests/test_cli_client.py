"""The `hailo-devmgr` command and the asyncio client, against a running daemon."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import env_with_src
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.client import AsyncClient, Client, DaemonUnreachable, DeviceError, tensor


def cli(*args, input_text=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "hailo_devmgr.cli", *args], env=env_with_src(),
                          capture_output=True, text=True, input=input_text, timeout=timeout)


def test_status_ping_load_infer_unload(daemon, model_dir):
    sock = ["--socket", daemon.socket_path]
    path = str(model_dir / "two.hef")
    result = cli(*sock, "ping")
    assert result.returncode == 0 and result.stdout.startswith("ok")
    assert cli(*sock, "load", path, "--type", "generic").stdout.strip() == "Model loaded"
    status = cli(*sock, "status")
    assert status.returncode == 0 and "models:      1 loaded" in status.stdout and path in status.stdout
    raw = json.loads(cli(*sock, "--json", "status").stdout)
    assert raw["loaded_models"][0]["model_path"] == path

    inputs = {"inputs": {"a": tensor(np.zeros((4, 4, 3), np.uint8)), "b": tensor(np.ones(8, np.float32))}}
    result = cli(*sock, "infer", path, "--type", "generic", "--input", "@-", input_text=json.dumps(inputs))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"]["sum"] == "<tensor float32 [8]>"
    result = cli(*sock, "--json", "infer", path, "--type", "generic", "--input", json.dumps(inputs))
    assert json.loads(result.stdout)["result"]["outputs"]["map"]["dtype"] == "uint8"

    assert cli(*sock, "unload", path, "--type", "generic").stdout.strip() == "Model unloaded"
    assert "networks" in json.loads(cli(*sock, "device").stdout)


def test_exit_codes_scripts_rely_on(daemon, model_dir, tmp_path):
    sock = ["--socket", daemon.socket_path]
    error = cli(*sock, "load", "/etc/passwd", "--type", "generic")
    assert error.returncode == 1 and "(forbidden)" in error.stderr
    assert cli(*sock, "infer", "x", "--input", "{not json").returncode == 2
    assert cli("nonsense").returncode == 2
    unreachable = cli("--socket", str(tmp_path / "nobody.sock"), "status")
    assert unreachable.returncode == 3 and "cannot connect" in unreachable.stderr
    timed_out = cli("--socket", str(tmp_path / "nobody.sock"), "wait", "--timeout", "0.3")
    assert timed_out.returncode == 75  # EX_TEMPFAIL: systemd does not call it a permission problem


def test_wait_reports_a_daemon_that_answers_with_an_error_at_once(tmp_path):
    """A socket-activated daemon with a broken file answers every client with the error."""
    import shutil
    socket_path = str(tmp_path / "broken.sock")
    config = tmp_path / "bad.yaml"
    config.write_text("max_loaded_models: lots\n")
    activate = subprocess.Popen([shutil.which("systemd-socket-activate"), "-l", socket_path, "-E", "PYTHONPATH",
                                 sys.executable, "-m", "hailo_devmgr", "--config", str(config)],
                                env=env_with_src(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(socket_path):
                break
            time.sleep(0.05)
        started = time.monotonic()
        result = cli("--socket", socket_path, "wait", "--timeout", "30")
        assert result.returncode == 1 and time.monotonic() - started < 20
        assert "the daemon answered" in result.stderr and "max_loaded_models" in result.stderr
    finally:
        activate.terminate()
        activate.wait(10)


def test_wait_returns_once_the_daemon_answers(tmp_path, model_dir):
    from conftest import DaemonProcess, write_config
    config = write_config(tmp_path, model_dir)
    socket_path = str(tmp_path / "sock" / "device.sock")
    waiter = subprocess.Popen([sys.executable, "-m", "hailo_devmgr.cli", "--socket", socket_path,
                               "wait", "--timeout", "30"], env=env_with_src())
    time.sleep(0.5)
    assert waiter.poll() is None  # still waiting: nobody listens yet
    daemon = DaemonProcess(tmp_path, config, socket_path).wait_ready()
    try:
        assert waiter.wait(30) == 0
    finally:
        daemon.stop()


def test_hailo_devmgr_honours_HAILO_DEVICE_SOCKET(daemon):
    result = subprocess.run([sys.executable, "-m", "hailo_devmgr.cli", "ping"],
                            env=env_with_src({"HAILO_DEVICE_SOCKET": daemon.socket_path}),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0


def test_async_client_many_concurrent_requests_on_one_connection(daemon, model_dir):
    path = str(model_dir / "two.hef")

    async def scenario():
        async with AsyncClient(daemon.socket_path, timeout=30) as client:
            await client.load_model(path, "generic")
            inputs = [{"inputs": {"a": tensor(np.full((4, 4, 3), i, np.uint8)),
                                  "b": tensor(np.full(8, i, np.float32))}} for i in range(10)]
            # The lock keeps v1's one-request-at-a-time rule while callers overlap.
            answers = await asyncio.gather(*(client.infer(path, data, "generic") for data in inputs),
                                           client.status(), client.ping())
            with pytest.raises(DeviceError) as info:
                await client.load_model("/etc/passwd", "generic")
            assert info.value.code == p.FORBIDDEN
            return answers

    answers = asyncio.run(scenario())
    sums = [answer["result"]["outputs"]["sum"] for answer in answers[:10]]
    assert len({s.tobytes() for s in sums}) == 10  # ten different inputs, ten different answers
    assert answers[10]["loaded_models"][0]["model_path"] == path


def test_clients_report_an_unreachable_daemon(tmp_path):
    with pytest.raises(DaemonUnreachable):
        Client(str(tmp_path / "none.sock")).ping()

    async def scenario():
        async with AsyncClient(str(tmp_path / "none.sock")) as client:
            await client.ping()
    with pytest.raises(DaemonUnreachable):
        asyncio.run(scenario())


def test_client_sees_a_daemon_that_dies_mid_request(start_daemon, model_dir):
    daemon = start_daemon()
    path = str(model_dir / "net.hef")
    errors = []

    def slow_request():
        try:
            with Client(daemon.socket_path, timeout=30) as client:
                client.infer(path, {"inputs": {"input_layer1": tensor(np.zeros((224, 224, 3), np.uint8))}},
                             "generic", {"simulate_ms": 5000})
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(1.0)
    daemon.process.kill()
    thread.join(30)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], DaemonUnreachable)


# ------------------------------------------------------------------ selftest

def test_selftest_runs_one_model_of_each_type_and_leaves_nothing_loaded(start_daemon, tmp_path):
    """Model files named as Hailo's model zoo names them, one per type (simulated HEFs)."""
    import yaml
    from test_handlers import NETS
    folder = tmp_path / "zoo"
    folder.mkdir()
    for name, net in (("scdepthv3.hef", NETS["depth.hef"]), ("yolov8s_pose.hef", NETS["pose.hef"]),
                      ("paddle_ocr_det.hef", NETS["ocr_det.hef"]), ("multi_input.hef", {
                          "inputs": [{"name": "a", "shape": [4, 4, 3], "format": "UINT8"},
                                     {"name": "b", "shape": [8], "format": "FLOAT32"}],
                          "outputs": [{"name": "y", "shape": [8], "format": "FLOAT32"}]})):
        (folder / name).write_text(yaml.safe_dump(net))
    for name in ("clip_vit_b_32_image_encoder.hef", "whisper_base.hef", "qwen2_vl_2b_instruct.hef"):
        (folder / name).write_text("a simulated HEF\n")
    daemon = start_daemon(model_dirs=[str(folder)])
    config = tmp_path / "selftest.yaml"
    config.write_text(yaml.safe_dump({"model_dirs": [str(folder)]}))
    sock = ["--socket", daemon.socket_path]
    result = cli(*sock, "selftest", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"generic", "clip", "depth", "pose", "ocr", "whisper", "vlm"}, result.stdout
    assert "FAILED" not in result.stdout and "HailoRT 5.2.0" in result.stdout
    assert "float32 [64, 80, 1]" in rows["depth"] and "segment(s)" in rows["whisper"]
    assert json.loads(cli(*sock, "--json", "status").stdout)["loaded_models"] == []

    (folder / "broken.hef").write_bytes(b"")  # an empty HEF: HAILO_INVALID_HEF
    failed = cli(*sock, "selftest", "--model", f"depth={folder / 'broken.hef'}")
    assert failed.returncode == 1 and "FAILED" in failed.stdout and "HAILO_INVALID_HEF" in failed.stdout
    assert cli(*sock, "selftest", "--model", "nonsense").returncode == 2
