"""hailo-ollama-config: the YAML checked, hailo-ollama's JSON rendered, limits and --verify.

The command runs in-process through main() (stderr captured), with a fake
``systemctl`` first on PATH that records its arguments and a tiny HTTP
server standing in for hailo-ollama; the real unit is exercised in
test_e2e_systemd.py.
"""
from __future__ import annotations

import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hailo_devmgr import ollama_service

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "etc" / "hailo" / "hailo-ollama.yaml"
# The issue's JSON for the template, key order included.
TEMPLATE_JSON = {
    "server": {"host": "0.0.0.0", "port": 11434},
    "library": {"host": "dev-public.hailo.ai", "port": 443},
    "main_poll_time_ms": 200,
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def render(capsys, tmp_path: Path, yaml_text: str | None, *extra: str) -> tuple[int, str, str, Path]:
    config = TEMPLATE if yaml_text is None else tmp_path / "hailo-ollama.yaml"
    if yaml_text is not None:
        config.write_text(yaml_text)
    output = tmp_path / "xdg" / "hailo-ollama" / "hailo-ollama.json"
    status = ollama_service.main(["--config", str(config), "--output", str(output), *extra])
    captured = capsys.readouterr()
    return status, captured.out, captured.err, output


@pytest.fixture
def fake_systemctl(tmp_path, monkeypatch):
    """A systemctl that logs its arguments; `is-active` prints $FAKE_ACTIVE (default active)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    log = tmp_path / "systemctl.log"
    script = folder / "systemctl"
    script.write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$1" in
  is-active) echo "${{FAKE_ACTIVE:-active}}"; [ "${{FAKE_ACTIVE:-active}}" = active ] ;;
  set-property) [ -z "$FAKE_FAIL" ] || {{ echo "Failed to set unit properties: Access denied" >&2; exit 1; }} ;;
esac
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
    return log


# ------------------------------------------------------------------ the template

def test_template_renders_exactly_the_issues_json(capsys, tmp_path):
    status, out, err, output = render(capsys, tmp_path, None)
    assert status == 0, err
    text = output.read_text()
    assert json.loads(text) == TEMPLATE_JSON
    assert list(json.loads(text)) == ["server", "library", "main_poll_time_ms"]  # upstream's order
    assert list(json.loads(text)["server"]) == ["host", "port"]
    assert text.endswith("}\n") and "resource_limits" not in text  # upstream would not know the key
    assert stat.S_IMODE(output.stat().st_mode) == 0o644
    assert "restart hailo-ollama" in out  # says when the limits apply


def test_template_limits_are_the_issues_defaults():
    config = ollama_service.load(str(TEMPLATE), cpus=1)
    assert ollama_service.limit_properties(config) == ["MemoryMax=4G", "CPUQuota=80%"]


def test_keys_left_out_take_the_templates_values(capsys, tmp_path):
    status, _, err, output = render(capsys, tmp_path, "")  # an empty file
    assert status == 0, err
    assert json.loads(output.read_text()) == TEMPLATE_JSON
    status, _, err, output = render(capsys, tmp_path, "server:\n  port: 8000\nresource_limits:\n  cpu_quota: 50%\n")
    assert status == 0, err
    assert json.loads(output.read_text()) == {**TEMPLATE_JSON, "server": {"host": "0.0.0.0", "port": 8000}}
    config = ollama_service.load(str(tmp_path / "hailo-ollama.yaml"), cpus=1)
    assert ollama_service.limit_properties(config) == ["MemoryMax=4G", "CPUQuota=50%"]


@pytest.mark.parametrize("given, expected", [
    ("memory_max: 536870912", "MemoryMax=536870912"),   # bytes as a YAML integer
    ("memory_max: 512m", "MemoryMax=512M"),
    ("memory_max: '1T'", "MemoryMax=1T"),
    ("cpu_quota: '400%'", "CPUQuota=400%"),             # four CPUs here
])
def test_limits_in_systemds_syntax(tmp_path, given, expected):
    (tmp_path / "c.yaml").write_text(f"resource_limits:\n  {given}\n")
    config = ollama_service.load(str(tmp_path / "c.yaml"), cpus=4)
    assert expected in ollama_service.limit_properties(config)


def test_rewriting_replaces_the_file_whole_and_leaves_no_temporary(capsys, tmp_path):
    output = tmp_path / "xdg" / "hailo-ollama" / "hailo-ollama.json"
    output.parent.mkdir(parents=True)
    output.write_text('{"edited": "by hand"}')
    output.chmod(0o600)
    status, _, err, _ = render(capsys, tmp_path, None)
    assert status == 0, err
    assert json.loads(output.read_text()) == TEMPLATE_JSON  # never drifts from the YAML
    assert stat.S_IMODE(output.stat().st_mode) == 0o644
    assert [path.name for path in output.parent.iterdir()] == ["hailo-ollama.json"]


# ------------------------------------------------------------------ refused

BAD = [
    ("servr:\n  port: 1\n", "servr: unknown key"),
    ("server:\n  hots: 0.0.0.0\n", "server.hots: unknown key"),
    ("resource_limits:\n  memory: 4G\n", "resource_limits.memory: unknown key"),
    ("server:\n  port: 0\n", "server.port: must be an integer from 1 to 65535, got 0"),
    ("server:\n  port: 65536\n", "server.port: must be an integer from 1 to 65535, got 65536"),
    ("server:\n  port: '11434'\n", "server.port: must be an integer from 1 to 65535, got '11434'"),
    ("library:\n  port: true\n", "library.port: must be an integer from 1 to 65535, got True"),
    ("server:\n  host: '::'\n", "server.host: hailo-ollama listens on IPv4 only"),
    ("server:\n  host: 'bad host!'\n", "server.host: not a valid host name or IP address"),
    ("server:\n  host: 300.1.1.1\n", "server.host: not a valid host name or IP address"),
    ("library:\n  host: -dev.hailo.ai\n", "library.host: not a valid host name or IP address"),
    ("library:\n  host: ''\n", "library.host: must be a host name or IP address"),
    ("library:\n  host: 443\n", "library.host: must be a host name or IP address, got 443"),
    ("server: 11434\n", "server: must be a mapping"),
    ("main_poll_time_ms: 0\n", "main_poll_time_ms: must be an integer from 1 to 65535"),
    ("main_poll_time_ms: 1.5\n", "main_poll_time_ms: must be an integer"),
    ("main_poll_time_ms: '200'\n", "main_poll_time_ms: must be an integer"),
    ("resource_limits:\n  memory_max: 4GB\n", "resource_limits.memory_max: must be bytes or a size like"),
    ("resource_limits:\n  memory_max: -1G\n", "resource_limits.memory_max: must be bytes or a size like"),
    ("resource_limits:\n  memory_max: 512K\n", "resource_limits.memory_max: at least 1M"),
    ("resource_limits:\n  memory_max: 0\n", "resource_limits.memory_max: at least 1M"),
    ("resource_limits:\n  cpu_quota: 80\n", "resource_limits.cpu_quota: must be a percentage"),
    ("resource_limits:\n  cpu_quota: 0%\n", "resource_limits.cpu_quota: must be a percentage"),
    ("resource_limits:\n  cpu_quota: 12.5%\n", "resource_limits.cpu_quota: must be a percentage"),
    ("- server\n- library\n", ": must be a mapping"),
    ("server:\n  host: [unclosed\n", "not valid YAML"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[message.split(":")[0] or "top" for _, message in BAD])
def test_bad_yaml_is_one_clear_line_exit_1_and_nothing_written(capsys, tmp_path, text, message):
    status, out, err, output = render(capsys, tmp_path, text)
    assert status == ollama_service.EXIT_INVALID == 1
    lines = err.splitlines()
    assert len(lines) == 1 and out == "", err
    assert lines[0].startswith(f"hailo-ollama-config: {tmp_path / 'hailo-ollama.yaml'}: ")
    assert message in lines[0]
    assert not output.exists()


def test_cpu_quota_above_the_cpus_here_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("resource_limits:\n  cpu_quota: 401%\n")
    with pytest.raises(ollama_service.ConfigError, match=r'from "1%" to "400%" \(4 CPU\(s\) here\)'):
        ollama_service.load(str(tmp_path / "c.yaml"), cpus=4)


def test_missing_file_is_one_line(capsys, tmp_path):
    status = ollama_service.main(["--config", str(tmp_path / "nope.yaml"), "--check"])
    assert status == 1
    assert capsys.readouterr().err == (f"hailo-ollama-config: {tmp_path / 'nope.yaml'}: "
                                       "cannot read: No such file or directory\n")


def test_check_writes_nothing(capsys, tmp_path):
    status, out, _, output = render(capsys, tmp_path, None, "--check")
    assert status == 0 and out.strip().endswith(": OK") and not output.exists()


def test_unwritable_output_is_exit_3_one_line(capsys, tmp_path):
    (tmp_path / "xdg").write_text("a file where the folder should be")
    status, _, err, _ = render(capsys, tmp_path, None)
    assert status == ollama_service.EXIT_SYSTEM == 3
    assert len(err.splitlines()) == 1 and "cannot write" in err


# ------------------------------------------------------------------ --apply (the unit's ExecStartPre)

def test_apply_writes_the_json_and_sets_the_limits_on_the_unit(capsys, tmp_path, fake_systemctl):
    port = free_port()
    status, _, err, output = render(capsys, tmp_path, f"server:\n  host: 127.0.0.1\n  port: {port}\n"
                                    "resource_limits:\n  memory_max: 768M\n  cpu_quota: 50%\n", "--apply")
    assert status == 0, err
    assert json.loads(output.read_text())["server"] == {"host": "127.0.0.1", "port": port}
    assert fake_systemctl.read_text().splitlines() == [
        "set-property --runtime hailo-ollama.service MemoryMax=768M CPUQuota=50%"]
    assert "MemoryMax=768M CPUQuota=50%" in err  # said in the journal


def test_apply_refuses_a_port_already_in_use(capsys, tmp_path, fake_systemctl):
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        status, _, err, output = render(capsys, tmp_path, f"server:\n  port: {port}\n", "--apply")
    assert status == ollama_service.EXIT_PORT_BUSY == 4
    assert len(err.splitlines()) == 1 and f"port {port} is already in use" in err
    assert not output.exists() and not fake_systemctl.exists()  # nothing done


def test_apply_fails_when_systemctl_refuses(capsys, tmp_path, fake_systemctl, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "1")
    status, _, err, _ = render(capsys, tmp_path, f"server:\n  port: {free_port()}\n", "--apply")
    assert status == ollama_service.EXIT_SYSTEM
    assert err.strip() == ("hailo-ollama-config: systemctl set-property hailo-ollama.service failed: "
                           "Failed to set unit properties: Access denied")


# ------------------------------------------------------------------ --check-binary (ExecCondition)

def test_check_binary_names_the_package_to_install(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(ollama_service, "BINARY", str(tmp_path / "hailo-ollama"))
    assert ollama_service.main(["--check-binary"]) == 1  # ExecCondition: skipped, not failed
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "install Hailo's hailo-gen-ai-model-zoo package" in err
    (tmp_path / "hailo-ollama").write_text("#!/bin/sh\n")
    (tmp_path / "hailo-ollama").chmod(0o755)
    assert ollama_service.main(["--check-binary"]) == 0


# ------------------------------------------------------------------ --verify

class StandIn(http.server.BaseHTTPRequestHandler):
    answers = {"/api/version": {"version": "5.1.1"}, "/api/tags": {"models": [{"name": "qwen2:1.5b"}]}}

    def do_GET(self):
        body = json.dumps(self.answers.get(self.path, {"error": "not found"})).encode()
        self.send_response(200 if self.path in self.answers else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_verify_passes_when_active_and_answering(capsys, tmp_path, fake_systemctl, server):
    status, out, err, _ = render(capsys, tmp_path, f"server:\n  port: {server}\n", "--verify")
    assert status == 0, err
    assert out.strip() == (f"hailo-ollama.service is active; http://127.0.0.1:{server} answers: "
                           "version 5.1.1, 1 model(s)")
    assert fake_systemctl.read_text().splitlines() == ["is-active hailo-ollama.service"]


def test_verify_fails_with_the_journal_hint_when_nothing_answers(capsys, tmp_path, fake_systemctl):
    port = free_port()
    status, _, err, _ = render(capsys, tmp_path, f"server:\n  port: {port}\n", "--verify", "--wait", "1")
    assert status == 1
    first, hint = err.splitlines()
    assert first.startswith(f"hailo-ollama-config: GET http://127.0.0.1:{port}/api/version failed: ")
    assert hint.endswith("journalctl -u hailo-ollama -n 100")


def test_verify_fails_when_the_unit_is_not_active(capsys, tmp_path, fake_systemctl, server, monkeypatch):
    monkeypatch.setenv("FAKE_ACTIVE", "failed")
    status, _, err, _ = render(capsys, tmp_path, f"server:\n  port: {server}\n", "--verify")
    assert status == 1
    assert "hailo-ollama.service is failed, not active" in err and "journalctl -u hailo-ollama -n 100" in err


def test_verify_fails_when_tags_is_missing(capsys, tmp_path, fake_systemctl, server, monkeypatch):
    monkeypatch.setattr(StandIn, "answers", {"/api/version": {"version": "5.1.1"}})
    status, _, err, _ = render(capsys, tmp_path, f"server:\n  port: {server}\n", "--verify")
    assert status == 1 and f"GET http://127.0.0.1:{server}/api/tags failed: HTTP 404" in err


# ------------------------------------------------------------------ as a command

def test_runs_as_a_module_with_only_stdlib_and_yaml(tmp_path):
    """Standalone: importing it pulls in no other hailo_devmgr module (the daemon's may change)."""
    code = ("import sys, hailo_devmgr.ollama_service as m; "
            "print(sorted(n for n in sys.modules if n.startswith('hailo_devmgr')))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    # The package's __init__ reads the version (_version: stdlib only); nothing else.
    assert loaded.stdout.strip() == "['hailo_devmgr', 'hailo_devmgr._version', 'hailo_devmgr.ollama_service']"
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: 70000\n")
    result = subprocess.run([sys.executable, "-m", "hailo_devmgr.ollama_service", "--config", str(bad), "--check"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 1
    assert result.stderr == (f"hailo-ollama-config: {bad}: server.port: must be an integer from 1 to 65535, "
                             "got 70000\n")
