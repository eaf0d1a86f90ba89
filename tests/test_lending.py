"""Lending the device (issue 18, part 2): lend releases every model and the
device (on the simulated backend its lock file, as a real VDevice's node);
device requests then answer device_lent naming the borrower while ping and
status go on; reclaim reopens it and loads the pins again; a restart during
a loan neither takes the device back nor forgets the loan; exclusive runs a
command with the device and always takes it back; idle_exit_s."""
from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import time

import pytest

from conftest import env_with_src
from hailo_devmgr.client import Client, DeviceError
from hailo_devmgr.wire import protocol as p
from hostile import needs_root, socket_folder  # noqa: F401  (socket_folder: a fixture)

NOBODY = 65534


def device_lock_is_free(lock_path) -> bool:
    """Could another program open the device now (take the simulated device's lock)?"""
    with open(lock_path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(file, fcntl.LOCK_UN)
        return True


def cli(socket_path: str, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hailo_devmgr.cli", "--socket", socket_path, *args],
                          env=env_with_src(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def lending_daemon(start_daemon, tmp_path, model_dir):
    (model_dir / "pinned.hef").write_text("simulated HEF\n")

    def start(**overrides):
        return start_daemon(lend_state_file=str(tmp_path / "lent.json"), pin=[
            {"model_type": "generic", "model_path": str(model_dir / "pinned.hef")}], **overrides)
    return start


def test_lend_releases_the_device_and_reclaim_takes_it_back(lending_daemon, tmp_path, model_dir):
    daemon = lending_daemon(device={"retry_s": 0.1})
    lock = tmp_path / "device.lock"
    net = str(model_dir / "net.hef")
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(net, "generic")
        assert not device_lock_is_free(lock)
        lent = client.request("lend", to="hailo-ollama.service")
        assert lent["lent_to"] == "hailo-ollama.service" and lent["lent_since"] <= time.time()
        status = client.status()
        assert status["lent_to"] == "hailo-ollama.service" and status["loaded_models"] == []
        assert device_lock_is_free(lock)   # the borrower can open the device
        with pytest.raises(DeviceError) as refused:
            client.load_model(net, "generic")
        assert refused.value.code == p.DEVICE_LENT and "lent to hailo-ollama.service" in refused.value.message
        assert refused.value.response["retry_after_ms"] > 0
        assert client.ping()["lent_to"] == "hailo-ollama.service"   # the control plane answers
        # Lending again to the same borrower is fine; to another is refused.
        assert client.request("lend", to="hailo-ollama.service")["lent_to"] == "hailo-ollama.service"
        with pytest.raises(DeviceError) as other:
            client.request("lend", to="someone-else")
        assert other.value.code == p.DEVICE_LENT

        back = client.request("reclaim")
        assert back["reclaimed"] is True and back["device_open"] is True
        assert not device_lock_is_free(lock)
        assert client.load_model(net, "generic")["status"] == "ok"
        deadline = time.monotonic() + 20   # the pin is loaded again in the background
        while not any(m["pinned"] for m in client.status()["loaded_models"]):
            assert time.monotonic() < deadline, client.status()["loaded_models"]
            time.sleep(0.05)
        assert client.status()["lent_to"] is None
        assert client.request("reclaim")["reclaimed"] is False   # not lent: nothing to do


def test_reclaim_while_the_borrower_still_holds_the_device_retries_on_demand(lending_daemon, tmp_path, model_dir):
    daemon = lending_daemon(device={"retry_s": 0.1})
    with Client(daemon.socket_path, timeout=30) as client:
        client.request("lend", to="a test")
        with open(tmp_path / "device.lock", "a+") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)   # the borrower has it open
            answer = client.request("reclaim")
            assert answer["reclaimed"] is True and answer["device_open"] is False
            assert "cannot be opened yet" in answer["message"]
        time.sleep(0.2)
        assert client.load_model(str(model_dir / "net.hef"), "generic")["status"] == "ok"


def test_a_restart_during_a_loan_keeps_the_device_lent(lending_daemon, tmp_path, model_dir):
    daemon = lending_daemon()
    with Client(daemon.socket_path, timeout=30) as client:
        client.request("lend", to="firmware update")
    assert daemon.stop() == 0
    assert json.loads((tmp_path / "lent.json").read_text())["to"] == "firmware update"
    daemon = lending_daemon()
    with Client(daemon.socket_path, timeout=30) as client:
        assert client.status()["lent_to"] == "firmware update"
        assert device_lock_is_free(tmp_path / "device.lock")   # not opened at start
        assert "not opening it until hailo-devmgr reclaim" in daemon.log()
        assert client.request("reclaim")["device_open"] is True
    assert not (tmp_path / "lent.json").exists()


@needs_root   # a client as another uid
def test_only_admins_may_lend_or_reclaim(start_daemon, socket_folder, readable_src):
    daemon = start_daemon(socket_path=f"{socket_folder}/device.sock", socket_mode="0666")
    for action in ("lend", "reclaim"):
        code = ("import json; from hailo_devmgr.client import Client, DeviceError\n"
                "try:\n"
                f"    Client({daemon.socket_path!r}).request({action!r}, to='me')\n"
                "    print('{}')\n"
                "except DeviceError as exc:\n"
                "    print(json.dumps({'code': exc.code, 'error': exc.message}))\n")
        result = subprocess.run([sys.executable, "-c", code], user=NOBODY, group=NOBODY,
                                env=env_with_src({"PYTHONPATH": readable_src}), capture_output=True, text=True,
                                timeout=60)
        answer = json.loads(result.stdout)
        assert answer.get("code") == p.FORBIDDEN and "for admins" in answer["error"], (result.stdout, result.stderr)
    with Client(daemon.socket_path, timeout=30) as client:
        assert client.status()["lent_to"] is None


def test_bad_lend_requests_are_clear(start_daemon):
    daemon = start_daemon()
    with Client(daemon.socket_path, timeout=30) as client:
        for fields, text in (({}, "lend needs to:"), ({"to": ""}, "lend needs to:"),
                             ({"to": "x" * 200}, "at most 128 printable characters"),
                             ({"to": "a\nb"}, "printable")):
            with pytest.raises(DeviceError) as refused:
                client.request("lend", **fields)
            assert refused.value.code == p.BAD_REQUEST and text in refused.value.message


def test_exclusive_runs_the_command_with_the_device_and_always_takes_it_back(start_daemon, tmp_path):
    daemon = start_daemon()
    lock = str(tmp_path / "device.lock")
    # The command checks it really has the device: status says lent, and it can take the lock.
    probe = ("import fcntl, sys; from hailo_devmgr.client import Client\n"
             f"lent = Client({daemon.socket_path!r}).status()['lent_to']\n"
             f"f = open({lock!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "print(lent); sys.exit(7)\n")
    result = cli(daemon.socket_path, "exclusive", "--", sys.executable, "-c", probe)
    assert result.returncode == 7, result.stderr   # the command's own status
    assert result.stdout.startswith("hailo-devmgr exclusive (python")
    assert "Device reclaimed" in result.stderr
    with Client(daemon.socket_path, timeout=30) as client:
        assert client.status()["lent_to"] is None
    missing = cli(daemon.socket_path, "exclusive", "--", "/nonexistent/tool")
    assert missing.returncode == 127 and "command not found" in missing.stderr
    assert cli(daemon.socket_path, "exclusive").returncode == 2   # no command: usage


def test_cli_lend_reclaim_and_wait_for_the_device(start_daemon):
    daemon = start_daemon()
    lent = cli(daemon.socket_path, "lend", "--to", "hailortcli", "--wait", "5")
    assert lent.returncode == 0 and lent.stdout.strip() == "device lent to hailortcli"
    waiting = cli(daemon.socket_path, "wait", "--device", "--timeout", "1")
    assert waiting.returncode == 75 and "lent to hailortcli" in waiting.stderr
    assert cli(daemon.socket_path, "wait", "--timeout", "5").returncode == 0   # the daemon itself answers
    back = cli(daemon.socket_path, "reclaim")
    assert back.returncode == 0 and back.stdout.strip() == "Device reclaimed"
    assert cli(daemon.socket_path, "wait", "--device", "--timeout", "5").returncode == 0


def test_idle_exit_leaves_cleanly_when_nothing_is_going_on(start_daemon):
    daemon = start_daemon(idle_exit_s=10)
    with Client(daemon.socket_path, timeout=30) as client:
        assert client.ping()["status"] == "ok"
        time.sleep(11)   # a connection open: no exit
        assert client.ping()["status"] == "ok"
    assert daemon.process.wait(30) == 0
    assert "idle for 10 s (idle_exit_s): exiting" in daemon.log()


def test_idle_exit_never_leaves_with_pinned_models(start_daemon, model_dir):
    daemon = start_daemon(idle_exit_s=10, pin=[{"model_type": "generic", "model_path": str(model_dir / "net.hef")}])
    time.sleep(12)
    assert daemon.process.poll() is None


def test_idle_exit_below_the_floor_is_refused(tmp_path, model_dir):
    """Each idle exit costs a start when the next client comes; systemd allows
    10 a minute before it fails the socket: shorter than 10 s is refused."""
    from conftest import write_config
    config = write_config(tmp_path, model_dir, idle_exit_s=2)
    result = subprocess.run([sys.executable, "-m", "hailo_devmgr", "--config", str(config), "--check-config"],
                            env=env_with_src(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "idle_exit_s: must be 0 (never) or at least 10" in result.stderr
