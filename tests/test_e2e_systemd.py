"""End to end: the .deb in a booted Debian with real systemd, as an admin uses it.

Each suite (Debian 12 and 13) boots one container; the steps below run in
order inside it: install with apt, socket activation, the simulated and the
real (absent) backend, a dependent unit, journald fields, SIGKILL, a hung
device call and the watchdog, SIGTERM with queued work, reload of a good and a
bad file, a broken conffile, a daemon that keeps failing, upgrade over an
older build with a dependent unit that must not bounce, purge, and the
unit's security exposure.

Needs root, systemd-nspawn and debootstrap (`make test` installs them). On
a machine without them `make test` reports this module as skipped with
the reason; under CI, or with HAILO_E2E_REQUIRED=1 (`make e2e`), that is a
failure instead.
"""
from __future__ import annotations

import json
import os
import re
import time

import pytest

import container as ct
from packages import ROOT

SUITES = ("bookworm", "trixie")
MODELS = "/var/lib/hailo/models"
TINY_NET = "inputs: [{name: x, shape: [4], format: UINT8}]\\noutputs: [{name: y, shape: [4], format: FLOAT32}]"
TINY_INPUT = '{"inputs":{"x":{"dtype":"uint8","shape":[4],"data_b64":"AQIDBA=="}}}'
SERVICE = "hailo-device-manager.service"
SOCKET = "hailo-device-manager.socket"

_reason = ct.unavailable_reason()
if _reason and (os.environ.get("CI") or os.environ.get("HAILO_E2E_REQUIRED")):
    pytest.fail(f"end-to-end tests cannot run here: {_reason}", pytrace=False)
pytestmark = [
    pytest.mark.skipif(_reason is not None, reason=f"end-to-end tests need a container: {_reason}"),
    # apt inside the container may take minutes on a busy machine or a slow
    # mirror: each step has its own timeouts, pytest's 120 s default is too short.
    pytest.mark.timeout(900),
]


@pytest.fixture(scope="module", params=SUITES)
def box(request, debs, older_debs, tmp_path_factory):
    suite = request.param
    root = ct.rootfs(suite)
    binds = {str(debs["hailo-device-manager"].parent): "/debs/new",
             str(older_debs["hailo-device-manager"].parent): "/debs/old",
             str(ROOT / "tests" / "fixtures"): "/fixtures"}  # the hailo-ollama stand-in
    machine = ct.Container(root, binds, tmp_path_factory.mktemp(f"e2e-{suite}") / "nspawn.log")
    machine.suite = suite
    yield machine
    machine.stop()


def dm(box, args: str, *, user: str = "alice", check: bool = True, timeout: float = 60):
    """hailo-devmgr inside the container, as a user."""
    return box.sh(f"hailo-devmgr {args}", user=user, check=check, timeout=timeout)


def wait_for(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def service_state(box) -> dict:
    return box.show(SERVICE, "ActiveState", "SubState", "MainPID", "NRestarts", "Result", "Type",
                    "StatusText", "ExecMainStatus")


def journal(box, args: str = "") -> str:
    return box.out(f"journalctl -u hailo-device-manager --no-pager {args}")


# ------------------------------------------------------------------ 1. install

def test_1_apt_install_creates_users_folders_rules_and_listening_socket(box):
    box.sh("apt-get update -qq", timeout=300)
    box.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q /debs/old/*.deb", timeout=600)
    assert box.out("dpkg-query -W -f='${Version}' hailo-device-manager") == "0.0.9"
    assert box.out("hailo-devmgr --version") == "hailo-devmgr 0.0.9"  # debian/changelog's version
    assert "hailo" in box.out("id -nG hailo-device-mgr").split()
    assert box.out(f"stat -c '%a %U %G' {MODELS}") == "2775 root hailo"
    box.sh("test -f /lib/udev/rules.d/60-hailo-device-manager.rules")
    box.sh("test -f /usr/lib/tmpfiles.d/hailo-device-manager.conf")
    assert box.out(f"systemctl is-enabled {SOCKET}") == "enabled"
    assert box.out(f"systemctl is-active {SOCKET}") == "active"
    assert box.out("stat -c '%a %U %G %F' /run/hailo/device.sock") == "660 root hailo socket"
    assert box.out(f"systemctl is-active {SERVICE}", check=False) == "inactive"  # not started yet
    box.sh("useradd -m -G hailo alice && useradd -m bob")
    box.sh(f"printf '{TINY_NET}\\n' > {MODELS}/tiny.hef && chgrp hailo {MODELS}/tiny.hef "
           f"&& chmod 0640 {MODELS}/tiny.hef")


# ------------------------------------------------------------------ 2. activation, real backend absent

def test_2_first_client_starts_the_service_and_outsiders_are_refused(box):
    dm(box, "status")
    state = service_state(box)
    assert (state["Type"], state["ActiveState"]) == ("notify", "active")
    assert state["StatusText"].startswith("hailo backend")
    # Packaged default: backend hailo, no HailoRT and no device here: status says why.
    wait_for(lambda: '"runtime_broken_reason": "HailoRT' in dm(box, "--json status").stdout,
             "the reason in status", timeout=20)
    refused = dm(box, f"load {MODELS}/tiny.hef --type generic", check=False)
    assert refused.returncode == 1 and "(device_unavailable)" in refused.stderr
    time.sleep(1)
    assert service_state(box)["NRestarts"] == "0"  # up, no crash loop
    outsider = dm(box, "status", user="bob", check=False)
    assert outsider.returncode == 3 and "Permission denied" in outsider.stderr
    assert "group, hailo by default" in outsider.stderr  # says what to do about it


# ------------------------------------------------------------------ 3. simulated backend

def test_3_simulated_backend_load_infer_unload(box):
    box.sh("mkdir -p /etc/systemd/system/hailo-device-manager.service.d && printf "
           "'[Service]\\nEnvironment=HAILO_DEVICE_BACKEND=simulated\\nWatchdogSec=4\\n' "
           "> /etc/systemd/system/hailo-device-manager.service.d/e2e.conf")
    # A conffile edit that the upgrade must keep: short budgets for the hang test.
    box.sh("printf 'watchdog:\\n  load_budget_s: 2\\n  infer_budget_s: 1\\nsimulated:\\n  load_ms: 20\\n"
           "  infer_ms: 5\\n' >> /etc/hailo/device-manager.yaml")
    box.sh(f"systemctl daemon-reload && systemctl stop {SERVICE}")
    assert dm(box, f"load {MODELS}/tiny.hef --type generic").stdout.strip() == "Model loaded"
    assert '"y": "<tensor float32 [4]>"' in dm(box, f"infer {MODELS}/tiny.hef --type generic "
                                                 f"--input '{TINY_INPUT}'").stdout
    wait_for(lambda: service_state(box)["StatusText"].startswith("simulated backend, 1 model(s) loaded"),
             "STATUS= to show the model")  # sent within a second of a change
    assert dm(box, f"unload {MODELS}/tiny.hef --type generic").stdout.strip() == "Model unloaded"
    forbidden = dm(box, "load /etc/passwd --type generic", check=False)
    assert forbidden.returncode == 1 and "(forbidden)" in forbidden.stderr
    # The sandboxed daemon sees a client's systemd unit (client_priorities by unit).
    probe = box.sh("systemd-run --quiet --wait --pipe --uid=alice --unit=hailo-e2e-probe "
                   "hailo-devmgr --json status", timeout=60)
    assert "hailo-e2e-probe.service" in [client.get("unit") for client in json.loads(probe.stdout)["clients"]]


HTTP_SOCKET, HTTP_SERVICE = "hailo-devmgr-http.socket", "hailo-devmgr-http.service"
GET_STATUS = ("python3 -c \"import json, urllib.request; "
              "print(json.dumps(json.load(urllib.request.urlopen('http://127.0.0.1:5099/v1/device/status'))))\"")


def test_3b_http_status_is_socket_activated_unprivileged_and_apart(box):
    """hailo-devmgr-http: its socket enabled and listening, the service started by the
    first request, as its own user in group hailo; the daemon itself stays AF_UNIX-only."""
    assert box.out(f"systemctl is-enabled {HTTP_SOCKET}") == "enabled"
    assert box.out(f"systemctl is-active {HTTP_SOCKET}") == "active"
    assert box.out(f"systemctl is-active {HTTP_SERVICE}", check=False) == "inactive"
    answer = json.loads(box.out(GET_STATUS, user="bob"))  # any local user may read the status
    assert answer["networks"]["source"] == "device_manager" and "device" in answer
    state = box.show(HTTP_SERVICE, "ActiveState", "MainPID")
    assert state["ActiveState"] == "active"
    assert box.out(f"stat -c %U /proc/{state['MainPID']}") == "hailo-devmgr-http"
    assert "hailo" in box.out("id -nG hailo-devmgr-http").split()
    metrics = box.out("python3 -c \"import urllib.request; "
                      "print(urllib.request.urlopen('http://127.0.0.1:5099/metrics').read().decode())\"")
    assert "hailo_devmgr_device_up 1.0" in metrics
    # The device-owning daemon may not even create an inet socket.
    assert box.show(SERVICE, "RestrictAddressFamilies")["RestrictAddressFamilies"] == "AF_UNIX"


OLLAMA_SOCKET, OLLAMA_SERVICE = "hailo-devmgr-ollama.socket", "hailo-devmgr-ollama.service"
CHAT = ("curl -sS http://127.0.0.1:11434/api/chat -d '{\"model\": \"tiny\", \"options\": {\"num_predict\": 3}, "
        "\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'")


def test_3c_ollama_gateway_is_socket_activated_when_enabled_and_stops_with_its_socket(box):
    """hailo-devmgr-ollama.socket: installed, not enabled (11434 may be another server's);
    enabled, curl reaches the Ollama API, whose service runs as hailo-devmgr-http; the
    status port is untouched; stopping the socket stops the service (BindsTo=)."""
    assert box.out(f"systemctl is-enabled {OLLAMA_SOCKET}", check=False) == "disabled"
    assert box.out(f"systemctl is-active {OLLAMA_SOCKET}", check=False) == "inactive"
    box.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl", timeout=600)
    box.sh(f"printf 'context_capacity: 4096\\n' > {MODELS}/llm.hef && chgrp hailo {MODELS}/llm.hef "
           f"&& chmod 0640 {MODELS}/llm.hef")
    box.sh(f"printf 'models:\\n  tiny:\\n    path: {MODELS}/llm.hef\\n    type: llm\\n' > /etc/hailo/models.yaml")
    box.sh(f"systemctl enable --now {OLLAMA_SOCKET}")
    assert box.out(f"systemctl is-active {OLLAMA_SERVICE}", check=False) == "inactive"
    tags = json.loads(box.out("curl -sS http://127.0.0.1:11434/api/tags", user="bob"))
    assert [model["name"] for model in tags["models"]] == ["tiny:latest"]
    lines = box.out(CHAT, user="bob").splitlines()
    final = json.loads(lines[-1])
    assert final["done"] is True and final["eval_count"] == 3 and len(lines) >= 2, lines
    state = box.show(OLLAMA_SERVICE, "ActiveState", "MainPID")
    assert state["ActiveState"] == "active"
    assert box.out(f"stat -c %U /proc/{state['MainPID']}") == "hailo-devmgr-http"
    assert json.loads(box.out(GET_STATUS))["networks"]["source"] == "device_manager"   # 5099 as before
    box.sh(f"systemctl stop {OLLAMA_SOCKET}", timeout=60)
    wait_for(lambda: box.out(f"systemctl is-active {OLLAMA_SERVICE}", check=False) == "inactive",
             "the gateway to stop with its socket")
    assert box.sh(CHAT, check=False).returncode != 0   # nothing listens on 11434 any more
    box.sh(f"systemctl disable {OLLAMA_SOCKET}")


# ------------------------------------------------------------------ 4. dependent unit

def test_4_dependent_unit_with_requires_on_the_socket(box):
    box.sh("cp /usr/share/doc/hailo-device-manager/examples/hailo-clip-search.service /etc/systemd/system/ "
           "&& systemctl daemon-reload")
    box.sh("systemctl start hailo-clip-search.service", timeout=90)
    assert box.show("hailo-clip-search.service", "Result")["Result"] == "success"
    box.sh(f"systemctl stop {SERVICE}")
    assert box.out(f"systemctl is-active {SOCKET}") == "active"
    box.sh("systemctl restart hailo-clip-search.service", timeout=90)  # re-activates the daemon
    assert box.show("hailo-clip-search.service", "Result")["Result"] == "success"
    assert service_state(box)["ActiveState"] == "active"


# ------------------------------------------------------------------ 5. journal

def test_5_journal_has_structured_fields(box):
    dm(box, f"load {MODELS}/tiny.hef --type generic")
    verbose = journal(box, "-o verbose")
    assert f"MODEL={MODELS}/tiny.hef" in verbose
    # The CLI's request ids count from its hello (protocol 2): any number will do.
    assert "MODEL_TYPE=generic" in verbose and re.search(r"REQUEST_ID=\d+", verbose)
    uid = box.out("id -u alice")
    assert f"CLIENT_UID={uid}" in verbose
    assert "ready on /run/hailo/device.sock" in journal(box)


# ------------------------------------------------------------------ 6. faults

def test_6a_sigkill_is_restarted_and_clients_reconnect(box):
    before = service_state(box)
    box.sh(f"systemctl kill -s SIGKILL {SERVICE}")
    wait_for(lambda: service_state(box)["MainPID"] not in ("0", before["MainPID"])
             and service_state(box)["ActiveState"] == "active", "a new main process")
    assert int(service_state(box)["NRestarts"]) == int(before["NRestarts"]) + 1
    dm(box, "wait --timeout 30")
    assert dm(box, "ping").stdout.startswith("ok")


def test_6b_hung_device_call_stops_watchdog_pings_and_systemd_restarts(box):
    before = service_state(box)
    box.sh(f"nohup hailo-devmgr infer {MODELS}/tiny.hef --type generic --params '{{\"simulate_hang_ms\": 60000}}' "
           f"--input '{TINY_INPUT}' >/dev/null 2>&1 &", user="root")   # a hang is root's test hook
    # Killed by the watchdog: Result=watchdog until the restart 2 s later.
    wait_for(lambda: service_state(box)["Result"] == "watchdog", "Result=watchdog", timeout=60)
    wait_for(lambda: int(service_state(box)["NRestarts"]) > int(before["NRestarts"]), "the watchdog restart",
             timeout=60)
    assert re.search(r"[Ww]atchdog timeout", journal(box)), journal(box)[-2000:]
    assert "withholding watchdog pings" in journal(box)
    dm(box, "wait --timeout 30")
    assert dm(box, "ping").stdout.startswith("ok")


def test_6c_sigterm_with_queued_work_stops_cleanly(box):
    # A 4 s inference needs more than test 3's 1 s budget: a drop-in raises it
    # (drop-ins add to or replace the conffile's keys), removed at the end.
    box.sh("mkdir -p /etc/hailo/device-manager.d && printf 'watchdog:\\n  infer_budget_s: 30\\n' "
           "> /etc/hailo/device-manager.d/e2e-6c.yaml")
    box.sh(f"systemctl restart {SERVICE}", timeout=60)
    dm(box, f"load {MODELS}/tiny.hef --type generic")
    infer = f"hailo-devmgr infer {MODELS}/tiny.hef --type generic --input '{TINY_INPUT}'"
    box.sh(f"nohup {infer} --params '{{\"simulate_ms\": 4000}}' > /tmp/running.out 2>&1 &",
           user="root")   # simulation knobs are root's test hooks
    wait_for(lambda: (json.loads(dm(box, "--json status").stdout).get("device_busy_with") or "").startswith("infer"),
             "the running inference", timeout=30)
    for index in range(3):
        box.sh(f"nohup {infer} > /tmp/queued-{index}.out 2>&1 &", user="alice")
    # Every client connected and queued before the stop: a client that connects
    # afterwards would (rightly) socket-activate the service again.
    wait_for(lambda: json.loads(dm(box, "--json status").stdout)["queue_depth"] >= 3, "three queued requests",
             timeout=30)
    box.sh(f"systemctl stop {SERVICE}", timeout=60)
    state = service_state(box)
    assert (state["ActiveState"], state["Result"], state["ExecMainStatus"]) == ("inactive", "success", "0")
    wait_for(lambda: box.out("cat /tmp/queued-2.out /tmp/running.out", check=False).count("\n") >= 2,
             "client answers", timeout=30)
    assert '"y"' in box.out("cat /tmp/running.out")  # the running inference finished
    for index in range(3):
        answer = box.out(f"cat /tmp/queued-{index}.out")
        assert "(shutting_down)" in answer or '"y"' in answer, answer  # answered either way, none lost
    assert "stopped" in journal(box)
    box.sh("rm -r /etc/hailo/device-manager.d")  # an admin's folder: purge would rightly keep it


def test_6d_idle_exit_then_the_socket_starts_it_again(box):
    """idle_exit_s: nothing going on, the daemon exits cleanly (the socket stays
    and the device is free); the next client starts it again."""
    box.sh("mkdir -p /etc/hailo/device-manager.d && printf 'idle_exit_s: 10\\n' "
           "> /etc/hailo/device-manager.d/e2e-6d.yaml")
    box.sh(f"systemctl restart {SERVICE}", timeout=60)
    wait_for(lambda: box.out(f"systemctl is-active {SERVICE}", check=False) == "inactive", "the idle exit",
             timeout=60)
    state = service_state(box)
    assert (state["Result"], state["ExecMainStatus"]) == ("success", "0"), state
    assert box.out(f"systemctl is-active {SOCKET}") == "active"
    assert "idle for 10 s (idle_exit_s): exiting" in journal(box)
    assert box.sh("hailo-devmgr ping").stdout.startswith("ok")   # activated again by the socket
    assert box.out(f"systemctl is-active {SERVICE}") == "active"
    box.sh("rm -r /etc/hailo/device-manager.d")
    # The starts of this test and the ones before stay within the start limit
    # (10 a minute) only if counted afresh: as an admin would after tests.
    box.sh(f"systemctl restart {SERVICE} && systemctl reset-failed {SERVICE}", timeout=60)


# ------------------------------------------------------------------ 7. broken conffile

def test_7_reload_takes_a_good_file_and_refuses_a_bad_one_where_the_admin_asked(box):
    """No /bin/kill (procps) on a minimal install; a bad file fails `systemctl reload`."""
    conffile = "/etc/hailo/device-manager.yaml"
    assert dm(box, "ping").stdout.startswith("ok")
    pid = service_state(box)["MainPID"]
    box.sh(f"cp {conffile} /root/before-reload.yaml && printf 'max_loaded_models: 3\\n' >> {conffile}")
    box.sh(f"systemctl reload {SERVICE}")
    wait_for(lambda: "configuration reloaded" in journal(box), "the reload")
    box.sh(f"printf 'max_loaded_models: lots\\n' >> {conffile}")
    refused = box.sh(f"systemctl reload {SERVICE}", check=False)
    assert refused.returncode != 0
    assert "max_loaded_models: must be an integer, got 'lots'" in box.out(f"systemctl status {SERVICE}",
                                                                          check=False)
    state = service_state(box)
    assert (state["ActiveState"], state["MainPID"]) == ("active", pid)  # still running, not restarted
    assert dm(box, "ping").stdout.startswith("ok")
    box.sh(f"cp /root/before-reload.yaml {conffile}")
    box.sh(f"systemctl reload {SERVICE}")


def test_7_broken_conffile_fails_clearly_and_fixing_it_recovers(box):
    conffile = "/etc/hailo/device-manager.yaml"
    box.sh(f"cp {conffile} /root/good.yaml && printf 'max_loaded_models: lots\\n' >> {conffile}")
    box.sh(f"systemctl restart {SERVICE}", check=False)
    wait_for(lambda: service_state(box)["ActiveState"] in ("failed", "inactive"), "the failed start")
    assert "max_loaded_models: must be an integer, got 'lots'" in journal(box)
    for _ in range(3):  # clients meanwhile get the reason at once, not a hang
        answer = dm(box, "status", check=False, timeout=30)
        assert answer.returncode == 1 and "configuration error" in answer.stderr, answer
    # wait prints what the daemon answered, at once, with a status systemd does not misname.
    waited = dm(box, "wait --timeout 30", check=False, timeout=20)
    assert waited.returncode == 1 and "the daemon answered" in waited.stderr, waited
    assert "max_loaded_models: must be an integer" in waited.stderr
    assert box.out(f"systemctl is-active {SOCKET}") == "active"  # the socket never fails
    # Fixing the file ends the instance that answers with the error (it does not
    # linger its 10 s): the next client starts the daemon afresh, no restart needed.
    box.sh(f"cp /root/good.yaml {conffile} && printf 'log_level: debug\\n' >> {conffile}")
    wait_for(lambda: service_state(box)["ActiveState"] in ("failed", "inactive"), "the erring instance to end")
    assert box.out(f"systemctl is-active {SOCKET}") == "active"
    assert dm(box, "ping").stdout.startswith("ok")


DEPENDENT = "hailo-e2e-dependent.service"


def start_dependent(box) -> dict:
    """A long-running service that follows the README: Requires= and After= the socket."""
    box.sh(f"printf '[Unit]\\nRequires={SOCKET}\\nAfter={SOCKET}\\n[Service]\\nExecStart=/bin/sleep infinity\\n' "
           f"> /etc/systemd/system/{DEPENDENT} && systemctl daemon-reload && systemctl start {DEPENDENT}")
    return box.show(DEPENDENT, "ActiveState", "ActiveEnterTimestamp", "MainPID")


def test_7c_a_daemon_that_keeps_failing_ends_failed_and_recovers_once_fixed(box):
    """Not a config error (those exit 1, not restarted): systemd restarts it every 2 s,
    until the start limit (10 a minute) fails it, which systemctl status explains."""
    dependent = start_dependent(box)
    crash = "/etc/systemd/system/hailo-device-manager.service.d/crash.conf"
    # Stands for any failure systemd restarts: the daemon's internal error exits 70.
    # Only this test's starts count towards the limit (the steps before used some).
    box.sh(f"systemctl stop {SERVICE} && systemctl reset-failed {SERVICE} && printf '[Service]\\nExecStart=\\nExecStart=/bin/sh -c \"exit 70\"\\n' "
           f"> {crash} && systemctl daemon-reload")
    hung = dm(box, "ping --timeout 3", check=False, timeout=30)  # starts the loop, never hangs
    # No answer within 3 s (75), or, on Debian 13, the queued connection reset when
    # the service fails (3): either way an exit, never a hang.
    assert hung.returncode in (3, 75), hung
    wait_for(lambda: box.show(SOCKET, "Result")["Result"] == "service-start-limit-hit", "the start limit",
             timeout=120)
    status = box.sh(f"systemctl status {SERVICE} --no-pager -n 20", check=False).stdout
    # Debian 12 shows the last exit and the start-limit line; Debian 13 the Result itself.
    assert "Start request repeated too quickly" in status or "Result: start-limit-hit" in status, status
    assert service_state(box)["ActiveState"] == "failed"
    refused = dm(box, "ping --timeout 3", check=False, timeout=30)
    assert refused.returncode == 3, refused  # at once: nothing listens
    # Units that Require= the socket are not stopped by its failure.
    assert box.show(DEPENDENT, "ActiveEnterTimestamp", "MainPID") == {
        key: dependent[key] for key in ("ActiveEnterTimestamp", "MainPID")}
    # Fixed: the README's two commands make the socket usable again.
    box.sh(f"rm {crash} && systemctl daemon-reload")
    box.sh(f"systemctl reset-failed {SERVICE} && systemctl start {SOCKET}")
    dm(box, "wait --timeout 30")
    assert dm(box, "ping").stdout.startswith("ok")


# ------------------------------------------------------------------ 8. upgrade and purge

def test_8a_upgrade_restarts_the_daemon_only_and_keeps_conffile_edits(box):
    """The daemon is restarted; its socket and the units that Require= it are not."""
    dependent = start_dependent(box)
    dm(box, "ping")
    pid_before = service_state(box)["MainPID"]
    socket_since = box.show(SOCKET, "ActiveEnterTimestamp")
    box.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q /debs/new/*.deb", timeout=300)
    assert box.out("dpkg-query -W -f='${Version}' hailo-device-manager") == "0.1.0"
    assert service_state(box)["MainPID"] not in ("0", pid_before)  # restarted on upgrade
    assert box.show(SOCKET, "ActiveEnterTimestamp") == socket_since  # never restarted
    assert box.show(DEPENDENT, "ActiveState", "ActiveEnterTimestamp", "MainPID") == dependent  # never bounced
    assert json.loads(dm(box, "--json status").stdout)["version"] == "0.1.0"  # the new changelog's
    conffile = box.out("cat /etc/hailo/device-manager.yaml")
    assert "log_level: debug" in conffile and "infer_budget_s: 1" in conffile
    assert dm(box, "ping").stdout.startswith("ok")


def test_9_security_exposure_is_recorded(box, capsys):
    report = box.sh(f"systemd-analyze security {SERVICE} --no-pager", check=False).stdout
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\S+)", report)
    assert match, report[-1500:]
    with capsys.disabled():
        print(f"\n[e2e {box.suite}] systemd-analyze security {SERVICE}: exposure {match.group(1)} "
              f"{match.group(2)}")
    assert float(match.group(1)) < 5.0


OLLAMA = "hailo-ollama.service"
OLLAMA_DROPIN = "/etc/systemd/system/hailo-ollama.service.d"
SERVICE_DROPIN = "/etc/systemd/system/hailo-device-manager.service.d"
E2E_DEVICE_DIR = "/var/lib/hailo-e2e"
OLLAMA_YAML = "/etc/hailo/hailo-ollama.yaml"


def ollama_journal(box) -> str:
    return box.out("journalctl -u hailo-ollama --no-pager -n 200", check=False)


def test_9b_hailo_ollama_service_runs_a_stand_in_with_its_limits_and_purge_keeps_its_models(box):
    """hailo-ollama-service: not enabled on install; without Hailo's binary the unit is
    skipped and names the package; with a stand-in for it (tests/fixtures), enable --now,
    --verify, the YAML's limits on this very start, its own user; a bad YAML and a busy
    port refused in one line; purge keeps /var/lib/hailo-ollama."""
    if box.out("dpkg-query -W -f='${Status}' hailo-ollama-service", check=False) != "install ok installed":
        box.sh("apt-get update -qq", timeout=300)  # run alone (-k ollama): install it here
        box.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q /debs/new/*.deb", timeout=600)
    assert box.out(f"systemctl is-enabled {OLLAMA}", check=False) == "disabled"
    assert box.out(f"systemctl is-active {OLLAMA}", check=False) == "inactive"
    assert "hailo" in box.out("id -nG hailo-ollama").split()

    # No hailo-ollama binary: skipped by ExecCondition, not failed, not restarted.
    box.sh(f"systemctl start {OLLAMA}", check=False, timeout=60)
    assert "install Hailo's hailo-gen-ai-model-zoo package" in ollama_journal(box)
    time.sleep(6)  # past RestartSec=5
    state = box.show(OLLAMA, "ActiveState", "NRestarts", "ExecMainPID")
    assert (state["ActiveState"], state["NRestarts"], state["ExecMainPID"]) == ("inactive", "0", "0"), state

    # Hailo's package, stood in for: the binary and one model manifest.
    box.sh("install -m 0755 /fixtures/hailo-ollama-standin /usr/bin/hailo-ollama && "
           "mkdir -p /usr/share/hailo-ollama/models/manifests/qwen2/1.5b && "
           "echo '{}' > /usr/share/hailo-ollama/models/manifests/qwen2/1.5b/manifest.json")
    # lend/reclaim are issue 18 part 2: until `hailo-devmgr lend` exists, this test-only
    # drop-in runs the unit without those two lines (the render step stays).
    if box.sh("hailo-devmgr lend --help", check=False).returncode != 0:
        box.sh(f"mkdir -p {OLLAMA_DROPIN} && printf '[Service]\\nExecStartPre=\\n"
               f"ExecStartPre=+/usr/bin/hailo-ollama-config --apply\\nExecStopPost=\\n' "
               f"> {OLLAMA_DROPIN}/e2e-no-lend.conf && systemctl daemon-reload")
    # The device handover for real: the manager's simulated device and the stand-in share
    # one lock file (test-only drop-ins: a folder both users reach, the stand-in told where).
    box.sh(f"mkdir -p {E2E_DEVICE_DIR} && chmod 0777 {E2E_DEVICE_DIR} && "
           f"install -m 0666 /dev/null {E2E_DEVICE_DIR}/device.lock && "
           f"mkdir -p {SERVICE_DROPIN} /etc/hailo/device-manager.d {OLLAMA_DROPIN} && "
           f"printf '[Service]\\nEnvironment=HAILO_DEVICE_BACKEND=simulated\\nReadWritePaths={E2E_DEVICE_DIR}\\n' "
           f"> {SERVICE_DROPIN}/e2e-9b.conf && "
           f"printf 'simulated:\\n  lock_path: {E2E_DEVICE_DIR}/device.lock\\n' > /etc/hailo/device-manager.d/e2e-9b.yaml && "
           f"printf '[Service]\\nEnvironment=HAILO_STANDIN_DEVICE_LOCK={E2E_DEVICE_DIR}/device.lock\\n' "
           f"> {OLLAMA_DROPIN}/e2e-device.conf && systemctl daemon-reload && systemctl restart {SERVICE}", timeout=60)
    box.sh(f"test -e {MODELS}/tiny.hef || (printf '{TINY_NET}\\n' > {MODELS}/tiny.hef && chgrp hailo {MODELS}/tiny.hef "
           f"&& chmod 0640 {MODELS}/tiny.hef)")
    box.sh(f"hailo-devmgr load {MODELS}/tiny.hef --type generic")   # the manager has the device open
    # Limits other than the unit's own 4G/80 %: they must come from the YAML, on this start.
    box.sh(f"sed -i 's/memory_max: \"4G\"/memory_max: \"768M\"/; s/cpu_quota: \"80%\"/cpu_quota: \"50%\"/' "
           f"{OLLAMA_YAML} && grep -q 768M {OLLAMA_YAML}")
    box.sh("systemctl enable --now hailo-ollama", timeout=60)
    verified = box.sh("hailo-ollama-config --verify --wait 20", timeout=60)
    assert verified.stdout.strip() == (f"{OLLAMA} is active; http://127.0.0.1:11434 answers: "
                                       "version 0.0.0-standin, 1 model(s)")
    assert box.out(f"systemctl is-enabled {OLLAMA}") == "enabled"
    state = box.show(OLLAMA, "MemoryMax", "CPUQuotaPerSecUSec", "MainPID", "ControlGroup")
    assert (state["MemoryMax"], state["CPUQuotaPerSecUSec"]) == (str(768 << 20), "500ms"), state
    # In the cgroup itself too, where the container's cgroup has the controllers (a
    # host without systemd may delegate none: then systemd keeps the values only).
    cgroup = f"/sys/fs/cgroup{state['ControlGroup']}"
    enabled = box.out("cat /sys/fs/cgroup/system.slice/cgroup.subtree_control", check=False).split()
    if "memory" in enabled:
        assert box.out(f"cat {cgroup}/memory.max") == str(768 << 20)
    if "cpu" in enabled:
        assert box.out(f"cat {cgroup}/cpu.max") == "50000 100000"
    box.sh("test -f /run/systemd/system.control/hailo-ollama.service.d/50-MemoryMax.conf")
    pid = state["MainPID"]
    assert box.out(f"stat -c %U /proc/{pid}") == "hailo-ollama"
    hailo_gid = box.out("getent group hailo").split(":")[2]
    assert hailo_gid in box.out(f"grep ^Groups: /proc/{pid}/status").split()[1:]  # may open /dev/hailo*
    assert json.loads(box.out("cat /etc/xdg/hailo-ollama/hailo-ollama.json")) == {
        "server": {"host": "0.0.0.0", "port": 11434}, "library": {"host": "dev-public.hailo.ai", "port": 443},
        "main_poll_time_ms": 200}
    assert box.out("stat -c '%a %U' /etc/xdg/hailo-ollama/hailo-ollama.json") == "644 root"
    assert box.out("stat -c %U /var/lib/hailo-ollama/models/blob") == "hailo-ollama"  # made by the server
    assert "stand-in hailo-ollama: /etc/xdg/hailo-ollama/hailo-ollama.json, data /var/lib/hailo-ollama" \
        in ollama_journal(box)  # upstream's XDG lookup lands where the unit says

    # While it runs it has the device: the manager lent it (ExecStartPre=+hailo-devmgr lend)
    # and let go of it, or the stand-in could not have taken it.
    assert f"stand-in hailo-ollama: holds the device ({E2E_DEVICE_DIR}/device.lock)" in ollama_journal(box)
    assert json.loads(box.out("hailo-devmgr --json status"))["lent_to"] == OLLAMA
    lent = box.sh(f"hailo-devmgr load {MODELS}/tiny.hef --type generic", check=False)
    assert lent.returncode == 1 and f"The device is lent to {OLLAMA}" in lent.stderr, lent

    # A bad YAML: one line in the journal, the server not started.
    box.sh(f"cp {OLLAMA_YAML} /root/ollama-good.yaml && sed -i 's/port: 11434/port: 70000/' {OLLAMA_YAML}")
    assert box.sh(f"systemctl restart {OLLAMA}", check=False, timeout=60).returncode != 0
    assert (f"hailo-ollama-config: {OLLAMA_YAML}: server.port: must be an integer from 1 to 65535, got 70000"
            in ollama_journal(box))
    assert box.show(OLLAMA, "MainPID")["MainPID"] == "0"
    box.sh(f"cp /root/ollama-good.yaml {OLLAMA_YAML} && systemctl reset-failed {OLLAMA} && systemctl restart {OLLAMA}",
           timeout=60)
    box.sh("hailo-ollama-config --verify --wait 20", timeout=60)

    # Stopped: --verify fails and says where to look.
    box.sh(f"systemctl stop {OLLAMA}", timeout=60)
    assert box.show(OLLAMA, "Result")["Result"] == "success"  # SIGTERM: a clean stop
    # ... and the device came back (ExecStopPost=+hailo-devmgr reclaim).
    assert json.loads(box.out("hailo-devmgr --json status"))["lent_to"] is None
    assert '"y": "<tensor float32 [4]>"' in box.out(f"hailo-devmgr infer {MODELS}/tiny.hef --type generic "
                                                   f"--input '{TINY_INPUT}'")   # the manager has it again
    # exclusive: lend, run, always give back, with the command's own status.
    assert box.sh("hailo-devmgr exclusive --to e2e -- sh -c 'hailo-devmgr --json status | grep -q lent_to.*e2e'",
                  check=False, timeout=60).returncode == 0
    assert box.sh("hailo-devmgr exclusive -- false", check=False, timeout=60).returncode == 1
    assert json.loads(box.out("hailo-devmgr --json status"))["lent_to"] is None
    refused = box.sh("hailo-ollama-config --verify --wait 1", check=False, timeout=60)
    assert refused.returncode == 1 and "journalctl -u hailo-ollama -n 100" in refused.stderr, refused

    # Another server on the port: refused in one line, rather than upstream's bind error.
    box.sh("systemd-run --unit=e2e-port-squatter python3 -m http.server --bind 127.0.0.1 11434")
    wait_for(lambda: box.sh("python3 -c \"import socket; socket.create_connection(('127.0.0.1', 11434))\"",
                            check=False).returncode == 0, "the squatter to listen", timeout=20)
    assert box.sh(f"systemctl start {OLLAMA}", check=False, timeout=60).returncode != 0
    assert "port 11434 is already in use" in ollama_journal(box)
    box.sh(f"systemctl stop e2e-port-squatter && systemctl stop {OLLAMA} && systemctl reset-failed {OLLAMA}",
           timeout=60)

    # Purge: configuration and generated files gone, models and user kept.
    box.sh("echo 'a pulled model' > /var/lib/hailo-ollama/models/blob/sha256_e2e")
    box.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q hailo-ollama-service", timeout=300)
    assert box.out("cat /var/lib/hailo-ollama/models/blob/sha256_e2e") == "a pulled model"
    box.sh("id hailo-ollama")
    leftovers = box.out(f"ls -d {OLLAMA_YAML} /etc/xdg/hailo-ollama /run/systemd/system.control/hailo-ollama.service.d "
                        "/etc/systemd/system/multi-user.target.wants/hailo-ollama.service 2>/dev/null", check=False)
    assert leftovers == "", leftovers
    assert box.out(f"systemctl is-active {OLLAMA}", check=False) == "inactive"
    box.sh(f"rm -rf {OLLAMA_DROPIN} /usr/bin/hailo-ollama /usr/share/hailo-ollama /root/ollama-good.yaml "
           f"{SERVICE_DROPIN}/e2e-9b.conf /etc/hailo/device-manager.d {E2E_DEVICE_DIR} "
           f"&& systemctl daemon-reload && systemctl restart {SERVICE}", timeout=60)


def test_8b_purge_stops_disables_and_removes_all_but_model_files(box):
    box.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q hailo-device-manager python3-hailo-devmgr",
           timeout=300)
    assert box.out(f"systemctl is-active {SERVICE} {SOCKET}", check=False).split() == ["inactive"] * 2
    assert box.sh(f"systemctl is-enabled {SOCKET}", check=False).returncode != 0
    leftovers = box.out("ls -A /etc/hailo /run/hailo/device.sock 2>/dev/null", check=False)
    assert leftovers == "", leftovers
    box.sh("test ! -e /etc/systemd/system/sockets.target.wants/hailo-device-manager.socket")
    box.sh(f"test -f {MODELS}/tiny.hef")  # a service's model file stays
