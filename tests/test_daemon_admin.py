"""Who may unload what: a client may unload models its own uid loaded; root,
the daemon's user and configured admins may unload any (unpinned) model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import env_with_src
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.client import Client
from hostile import hostile_daemon, socket_folder  # noqa: F401

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")


def as_uid(uid: int, src: str, socket_path: str, action: str, model_path: str) -> dict:
    code = ("import json, sys; from hailo_devmgr.client import Client, DeviceError\n"
            "try:\n"
            f"    print(json.dumps(Client({socket_path!r}).request({action!r}, model_path={model_path!r}, "
            "model_type='generic')))\n"
            "except DeviceError as exc:\n"
            "    print(json.dumps({'code': exc.code, 'error': exc.message}))\n")
    result = subprocess.run([sys.executable, "-c", code], user=uid, group=uid, env=env_with_src({"PYTHONPATH": src}),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def shared_daemon(start_daemon, socket_folder):
    return start_daemon(socket_path=f"{socket_folder}/device.sock", socket_mode="0666")


def test_a_user_cannot_unload_another_users_model(shared_daemon, model_dir, readable_src):
    roots = str(model_dir / "net.hef")
    with Client(shared_daemon.socket_path, timeout=30) as client:
        client.load_model(roots, "generic")
    refused = as_uid(NOBODY, readable_src, shared_daemon.socket_path, "unload_model", roots)
    assert refused["code"] == p.FORBIDDEN and "loaded by another user (uid 0)" in refused["error"]

    theirs = str(model_dir / "other.hef")
    assert as_uid(NOBODY, readable_src, shared_daemon.socket_path, "load_model", theirs)["message"] == "Model loaded"
    assert as_uid(NOBODY, readable_src, shared_daemon.socket_path, "unload_model", theirs)["message"] == "Model unloaded"
    with Client(shared_daemon.socket_path, timeout=30) as client:  # root is an admin
        assert client.unload_model(roots, "generic")["message"] == "Model unloaded"


def test_configured_admin_uid_may_unload_any_model(start_daemon, model_dir, socket_folder, readable_src):
    daemon = start_daemon(socket_path=f"{socket_folder}/device.sock", socket_mode="0666",
                          admin={"uids": [NOBODY]})
    roots = str(model_dir / "net.hef")
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(roots, "generic")
    assert as_uid(NOBODY, readable_src, daemon.socket_path, "unload_model", roots)["message"] == "Model unloaded"


def test_a_member_of_an_admin_group_may_unload_any_model(hostile_daemon, model_dir, readable_src):
    """Supplementary groups come from SO_PEERGROUPS at connect, not /proc: a
    sandbox may hide other users' /proc entries from the daemon, and a pid
    read later may be another process's."""
    from hostile import ATTACKER, SOCKET_GROUP, attack
    daemon = hostile_daemon(admin={"groups": [SOCKET_GROUP]})
    roots = str(model_dir / "net.hef")
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(roots, "generic")
    out = attack(ATTACKER, readable_src, daemon.socket_path, """
        from hailo_devmgr.client import Client
        print(Client(SOCK, timeout=30).unload_model(ARGS[0], "generic")["message"])
    """, roots)
    assert out.strip() == "Model unloaded"
