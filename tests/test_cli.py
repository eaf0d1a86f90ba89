"""`hailo-devmgr` as an admin types it: timeouts, --type, tensors from files (issue 21)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import env_with_src
from hailo_devmgr.cli import command as cli_module


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "hailo_devmgr.cli", *args], env=env_with_src(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def silent_socket(tmp_path):
    """A socket that takes connections and never answers (a daemon stuck starting)."""
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(16)
        yield path


@pytest.mark.parametrize("command", [["ping"], ["status"], ["device"], ["load", "/m.hef", "--type", "generic"],
                                     ["infer", "/m.hef", "--type", "generic", "--input", "{}"]])
def test_every_command_gives_up_after_its_timeout(silent_socket, command):
    result = cli("--socket", silent_socket, *command, "--timeout", "0.5", timeout=30)
    assert result.returncode == 75, result  # EX_TEMPFAIL, as for wait
    assert "no answer within 0.5 s (--timeout)" in result.stderr


def test_default_timeouts_are_short_for_control_and_long_for_device_work():
    parser = cli_module.build_parser()
    timeout = {name: parser.parse_args([name, *extra]).timeout for name, extra in (
        ("ping", []), ("status", []), ("load", ["/m", "--type", "clip"]), ("infer", ["/m", "--input", "{}"]))}
    assert timeout["ping"] <= 10 and timeout["status"] <= 10
    # Longer than the daemon's default budgets: its watchdog ends a hung call first.
    assert timeout["load"] > 300 and timeout["infer"] > 300 + 120


def test_load_requires_the_type_and_other_commands_take_it_from_status(daemon, model_dir, tmp_path):
    sock = ["--socket", daemon.socket_path]
    path = str(model_dir / "net.hef")
    missing = cli(*sock, "load", path)
    assert missing.returncode == 2 and "load needs --type" in missing.stderr
    unknown = cli(*sock, "unload", path)
    assert unknown.returncode == 2 and "is not loaded: say which with --type" in unknown.stderr
    assert cli(*sock, "load", path, "--type", "generic").returncode == 0
    np.save(tmp_path / "x.npy", np.zeros((224, 224, 3), np.uint8))
    inferred = cli(*sock, "infer", path, "--tensor", f"inputs.input_layer1={tmp_path / 'x.npy'}")
    assert inferred.returncode == 0, inferred.stderr
    assert "--type generic (from the loaded model)" in inferred.stderr
    unloaded = cli(*sock, "unload", path)
    assert unloaded.returncode == 0 and unloaded.stdout.strip() == "Model unloaded", unloaded


def test_infer_takes_tensors_from_npy_files_and_raw_bytes(daemon, model_dir, tmp_path):
    sock = ["--socket", daemon.socket_path]
    path = str(model_dir / "two.hef")
    np.save(tmp_path / "a.npy", np.zeros((4, 4, 3), np.uint8))
    np.ones(8, np.float32).tofile(tmp_path / "b.bin")
    result = cli(*sock, "infer", path, "--type", "generic", "--tensor", f"inputs.a={tmp_path / 'a.npy'}",
                 "--tensor", f"inputs.b={tmp_path / 'b.bin'}", "--dtype", "float32", "--shape", "8")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"]["sum"] == "<tensor float32 [8]>"
    raw_without_shape = cli(*sock, "infer", path, "--type", "generic", "--tensor", f"inputs.b={tmp_path / 'b.bin'}")
    assert raw_without_shape.returncode == 2 and "raw bytes need --dtype and --shape" in raw_without_shape.stderr
