"""The Debian packages: build, lintian, contents, and install/upgrade/purge with dpkg.

The build runs `make deb` (dpkg-buildpackage -us -uc -b) once per session.
Install tests change this machine (as a chroot would see it: no systemd
running, so maintainer scripts must cope) and purge what they installed.
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from packages import OLD_VERSION, OLLAMA_PACKAGE, PACKAGES, ROOT, SYSTEM_ENV, run
def contents(deb: Path) -> str:
    return run("dpkg-deb", "-c", str(deb)).stdout


def field(deb: Path, name: str) -> str:
    return run("dpkg-deb", "-f", str(deb), name).stdout.strip()


def control_file(deb: Path, name: str) -> str:
    return run("dpkg-deb", "-I", str(deb), name).stdout


# ------------------------------------------------------------------ build

def test_lintian_reports_no_errors_or_warnings(debs):
    changes = next(debs["hailo-device-manager"].parent.glob("*.changes"))
    result = run("lintian", "--fail-on", "error,warning", "--display-info", str(changes), check=False,
                 timeout=600)
    problems = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert result.returncode == 0 and problems == [], result.stdout + result.stderr


def test_daemon_package_contents_and_fields(debs):
    deb = debs["hailo-device-manager"]
    listing = contents(deb)
    # debhelper puts units and udev rules under /lib on Debian 12, /usr/lib from 13 (merged /usr).
    listing = listing.replace("./usr/lib/systemd/", "./lib/systemd/").replace("./usr/lib/udev/", "./lib/udev/")
    for path in ("./lib/systemd/system/hailo-device-manager.socket",
                 "./lib/systemd/system/hailo-device-manager.service",
                 "./usr/lib/sysusers.d/hailo-device-manager.conf",
                 "./lib/udev/rules.d/60-hailo-device-manager.rules",
                 "./usr/lib/tmpfiles.d/hailo-device-manager.conf",
                 "./etc/hailo/device-manager.yaml",
                 "./usr/bin/hailo-device-manager", "./usr/bin/hailo-devmgr",
                 "./usr/share/man/man8/hailo-device-manager.8.gz",
                 "./usr/share/man/man1/hailo-devmgr.1.gz",
                 "./usr/share/doc/hailo-device-manager/copyright",
                 "./usr/share/doc/hailo-device-manager/examples/hailo-clip-search.service"):
        assert path in listing, path
    # The daemon's modules are here; the client library's are python3-hailo-devmgr's.
    assert "/dist-packages/hailo_devmgr/daemon/dispatch.py" in listing
    assert "/dist-packages/hailo_devmgr/client/" not in listing and "/hailo_devmgr/wire/" not in listing
    assert field(deb, "Architecture") == "all"
    depends = field(deb, "Depends")
    for name in ("python3-systemd", "python3-yaml", "python3-hailo-devmgr"):
        assert name in depends
    assert "sdnotify" not in depends  # sd_notify is sent by the daemon itself (systemd.py)
    assert "hailort" not in depends  # never a hard dependency
    assert "python3-h10-hailort | python3-hailort" in field(deb, "Recommends")
    assert control_file(deb, "conffiles").split() == ["/etc/hailo/device-manager.yaml", "/etc/hailo/models.yaml"]


def test_library_package_has_the_module_and_no_daemon_files(debs):
    deb = debs["python3-hailo-devmgr"]
    listing = contents(deb)
    assert "/dist-packages/hailo_devmgr/client/library.py" in listing
    assert "/dist-packages/hailo_devmgr/wire/protocol.py" in listing
    # The client library alone: nothing of the daemon, its units or its commands.
    assert "/dist-packages/hailo_devmgr/daemon/" not in listing
    assert "systemd/system" not in listing and "./usr/bin/" not in listing
    depends = field(deb, "Depends")
    assert "python3-numpy" in depends
    assert "python3-yaml" not in depends  # the configuration is the daemon's
    assert "python3-systemd" not in depends and "sdnotify" not in depends  # the daemon's needs only


def test_maintainer_scripts_enable_the_socket_not_the_service(debs):
    postinst = control_file(debs["hailo-device-manager"], "postinst")
    assert "systemd-sysusers" in postinst and "systemd-tmpfiles" in postinst
    enable_lines = [line for line in postinst.splitlines() if "deb-systemd-helper enable" in line]
    assert any("hailo-device-manager.socket" in line for line in enable_lines)
    # The service has no [Install]: nothing to enable, and no Also= making its
    # snippets act on the socket as well.
    assert "hailo-device-manager.service" not in "\n".join(enable_lines)
    assert "deb-systemd-invoke try-restart 'hailo-device-manager.service' " in postinst  # upgrade
    # An upgrade never stops or restarts a socket: units that Require= it would bounce.
    invoked = [line.split("deb-systemd-invoke", 1)[1] for line in postinst.splitlines()
               if "deb-systemd-invoke" in line]
    assert not [line for line in invoked if ".socket" in line and "restart" in line], invoked
    prerm = control_file(debs["hailo-device-manager"], "prerm")
    before_each_stop = prerm.split("deb-systemd-invoke stop")[:-1]
    assert before_each_stop and all('[ "$1" = remove ]' in text.rstrip().splitlines()[-1] for text in before_each_stop)
    assert "udevadm trigger" in postinst  # an already-present /dev/hailo0 gets the rule


def test_conffile_in_package_selects_real_hardware(debs, tmp_path):
    run("dpkg-deb", "-x", str(debs["hailo-device-manager"]), str(tmp_path))
    text = (tmp_path / "etc/hailo/device-manager.yaml").read_text()
    assert "\nbackend: hailo\n" in text
    # /lib on Debian 12, /usr/lib from 13 (debhelper follows the release's layout).
    [unit_path] = [path for path in (tmp_path / "lib/systemd/system/hailo-device-manager.service",
                                     tmp_path / "usr/lib/systemd/system/hailo-device-manager.service")
                   if path.exists()]
    unit = unit_path.read_text()
    assert "ExecStart=/usr/bin/hailo-device-manager\n" in unit
    assert "RestartPreventExitStatus=1\n" in unit  # a broken conffile does not crash-loop


# ------------------------------------------------------------------ install

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="installing packages with dpkg needs root")


def dpkg_install(*debs: Path):
    return run("dpkg", "-i", *map(str, debs), timeout=300)


def purge():
    # hailo-ollama-service first in the same call: it Depends on hailo-device-manager.
    run("dpkg", "--purge", OLLAMA_PACKAGE, *PACKAGES, check=False, timeout=300)


@pytest.fixture
def clean_system():
    purge()
    yield
    purge()


def installed_version(package: str) -> str:
    return run("dpkg-query", "-W", "-f=${Version}", package).stdout


def start_installed_daemon(tmp_path: Path, *extra_env: str) -> subprocess.Popen:
    socket_path = tmp_path / "device.sock"
    env = {**SYSTEM_ENV, "HAILO_DEVICE_SOCKET": str(socket_path),
           "HAILO_DEVICE_MODEL_DIRS": str(tmp_path)}
    for item in extra_env:
        key, value = item.split("=", 1)
        env[key] = value
    process = subprocess.Popen(["/usr/bin/hailo-device-manager"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not socket_path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return process


@needs_root
def test_install_creates_users_folders_and_enables_socket(debs, clean_system, tmp_path):
    result = dpkg_install(debs["python3-hailo-devmgr"], debs["hailo-device-manager"])
    output = result.stdout + result.stderr
    if not any(Path("/dev").glob("hailo*")):
        assert "warning: no Hailo device node (/dev/hailo0)" in output  # a warning, not a failure
    user = pwd.getpwnam("hailo-device-mgr")
    assert user.pw_shell == "/usr/sbin/nologin"
    assert "hailo-device-mgr" in grp.getgrnam("hailo").gr_mem
    models = os.stat("/var/lib/hailo/models")
    assert stat.S_IMODE(models.st_mode) == 0o2775
    assert (models.st_uid, grp.getgrgid(models.st_gid).gr_name) == (0, "hailo")
    assert Path("/etc/systemd/system/sockets.target.wants/hailo-device-manager.socket").is_symlink()
    assert not list(Path("/etc/systemd/system").glob("*.wants/hailo-device-manager.service"))

    version = installed_version("hailo-device-manager")  # debian/changelog's: the one source
    assert run("/usr/bin/hailo-devmgr", "--version").stdout.strip() == f"hailo-devmgr {version}"
    assert f"hailo-device-manager {version}" in run("/usr/bin/hailo-device-manager", "--version").stdout
    assert '"backend": "hailo"' in run("/usr/bin/hailo-device-manager", "--check-config").stdout
    # The commands import their function (debian/lean-entry-scripts) and the version comes
    # from the metadata file: nothing loads importlib.metadata (1.5 MiB more in the daemon).
    for command, flag in (("hailo-devmgr", "--version"), ("hailo-device-manager", "--version"),
                          ("hailo-devmgr-http", "--help")):
        imports = run(f"/usr/bin/{command}", flag, env={**SYSTEM_ENV, "PYTHONPROFILEIMPORTTIME": "1"}).stderr
        assert "hailo_devmgr._version" in imports and "importlib.metadata" not in imports, imports[-2000:]
    run("/usr/bin/python3", "-c", "import hailo_devmgr.client, hailo_devmgr.daemon")

    # The packaged default (backend: hailo) without hardware: up, with the reason.
    daemon = start_installed_daemon(tmp_path)
    try:
        status = run("/usr/bin/hailo-devmgr", "--socket", str(tmp_path / "device.sock"), "--json", "status")
        assert "HailoRT" in status.stdout or "device node" in status.stdout
        (tmp_path / "m.hef").write_text("x")
        refused = run("/usr/bin/hailo-devmgr", "--socket", str(tmp_path / "device.sock"),
                      "load", str(tmp_path / "m.hef"), "--type", "generic", check=False)
        assert refused.returncode == 1 and "(device_unavailable)" in refused.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0


@needs_root
def test_broken_conffile_is_one_clear_line_and_fixing_it_recovers(debs, clean_system, tmp_path):
    dpkg_install(debs["python3-hailo-devmgr"], debs["hailo-device-manager"])
    conffile = Path("/etc/hailo/device-manager.yaml")
    good = conffile.read_text()
    conffile.write_text(good.replace("backend: hailo", "backend: hailo\nmax_loaded_models: many"))
    broken = run("/usr/bin/hailo-device-manager", check=False, timeout=30)
    assert broken.returncode == 1  # the unit's RestartPreventExitStatus: no crash loop
    assert broken.stderr.strip() == ("hailo-device-manager: configuration error: /etc/hailo/device-manager.yaml: "
                                     "max_loaded_models: must be an integer, got 'many'")
    conffile.write_text(good.replace("backend: hailo", "backend: simulated"))
    daemon = start_installed_daemon(tmp_path, f"HAILO_DEVICE_CONFIG={conffile}")
    try:
        (tmp_path / "m.hef").write_text("x")
        loaded = run("/usr/bin/hailo-devmgr", "--socket", str(tmp_path / "device.sock"),
                     "load", str(tmp_path / "m.hef"), "--type", "generic")
        assert loaded.stdout.strip() == "Model loaded"
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0


@needs_root
def test_upgrade_keeps_conffile_edits_and_purge_cleans_up(debs, older_debs, clean_system):
    dpkg_install(older_debs["python3-hailo-devmgr"], older_debs["hailo-device-manager"])
    assert installed_version("hailo-device-manager") == OLD_VERSION
    conffile = Path("/etc/hailo/device-manager.yaml")
    conffile.write_text(conffile.read_text().replace("#log_level: info", "log_level: debug"))

    assert run("/usr/bin/hailo-devmgr", "--version").stdout.strip() == f"hailo-devmgr {OLD_VERSION}"
    dpkg_install(debs["python3-hailo-devmgr"], debs["hailo-device-manager"])  # upgrade
    assert installed_version("hailo-device-manager") == "0.1.0"
    assert run("/usr/bin/hailo-devmgr", "--version").stdout.strip() == "hailo-devmgr 0.1.0"
    assert "\nlog_level: debug\n" in conffile.read_text()
    dpkg_install(debs["python3-hailo-devmgr"], debs["hailo-device-manager"])  # reinstall
    assert "\nlog_level: debug\n" in conffile.read_text()

    run("dpkg", "--remove", *PACKAGES)
    assert conffile.exists()  # remove keeps configuration
    assert not Path("/usr/bin/hailo-device-manager").exists()
    purge()
    assert not conffile.exists() and not Path("/etc/hailo").exists()
    assert not Path("/var/lib/hailo/models").exists()  # empty: removed
    assert not Path("/etc/systemd/system/sockets.target.wants/hailo-device-manager.socket").exists()


@needs_root
def test_purge_keeps_model_files(debs, clean_system):
    dpkg_install(debs["python3-hailo-devmgr"], debs["hailo-device-manager"])
    model = Path("/var/lib/hailo/models/service-model.hef")
    model.write_text("a service's model")
    try:
        purge()
        assert model.read_text() == "a service's model"
    finally:
        model.unlink()
        for folder in ("/var/lib/hailo/models", "/var/lib/hailo"):
            try:
                os.rmdir(folder)
            except OSError:
                pass


# ------------------------------------------------------------------ hailo-ollama-service

def unit_text(root: Path, name: str) -> str:
    """A unit from an extracted package (/lib on Debian 12, /usr/lib from 13)."""
    [path] = [path for path in (root / "lib/systemd/system" / name, root / "usr/lib/systemd/system" / name)
              if path.exists()]
    return path.read_text()


def test_ollama_package_contents_fields_and_conffile(debs):
    deb = debs[OLLAMA_PACKAGE]
    listing = contents(deb).replace("./usr/lib/systemd/", "./lib/systemd/")
    for path in ("./lib/systemd/system/hailo-ollama.service",
                 "./usr/lib/sysusers.d/hailo-ollama-service.conf",
                 "./usr/lib/tmpfiles.d/hailo-ollama-service.conf",
                 "./etc/hailo/hailo-ollama.yaml",
                 "./usr/bin/hailo-ollama-config",
                 "/dist-packages/hailo_devmgr/ollama_service.py",
                 "./usr/share/man/man8/hailo-ollama-config.8.gz",
                 "./usr/share/doc/hailo-ollama-service/hailo-ollama.md.gz",
                 "./usr/share/doc/hailo-ollama-service/copyright"):
        assert path in listing, path
    assert "hailo-ollama.json" not in listing  # generated at start, never shipped
    others = contents(debs["hailo-device-manager"]) + contents(debs["python3-hailo-devmgr"])
    assert "ollama_service" not in others and "hailo-ollama" not in others  # each file in one package
    assert field(deb, "Architecture") == "all"
    depends = field(deb, "Depends")
    assert "hailo-device-manager (= 0.1.0)" in depends and "python3-yaml" in depends  # the lending CLI, the YAML
    assert "hailo-gen-ai-model-zoo" not in depends and "hailort" not in depends  # Hailo's, never a hard dependency
    assert field(deb, "Suggests") == "hailo-gen-ai-model-zoo"  # provides /usr/bin/hailo-ollama
    assert control_file(deb, "conffiles").split() == ["/etc/hailo/hailo-ollama.yaml"]


def test_ollama_unit_is_the_issues(debs, tmp_path):
    run("dpkg-deb", "-x", str(debs[OLLAMA_PACKAGE]), str(tmp_path))
    lines = unit_text(tmp_path, "hailo-ollama.service").splitlines()
    for line in ("Type=simple", "User=hailo-ollama", "Group=hailo-ollama", "SupplementaryGroups=hailo",
                 "StateDirectory=hailo-ollama",
                 "Environment=XDG_CONFIG_HOME=/etc/xdg XDG_CONFIG_DIRS=/etc/xdg XDG_DATA_HOME=/var/lib "
                 "XDG_DATA_DIRS=/var/lib",
                 "Wants=network-online.target", "After=network-online.target",
                 "Restart=always", "RestartSec=5", "TimeoutStopSec=30", "KillSignal=SIGTERM",
                 "ExecCondition=/usr/bin/hailo-ollama-config --check-binary",
                 "ExecStart=/usr/bin/hailo-ollama", "WantedBy=multi-user.target",
                 "Conflicts=hailo-devmgr-ollama.socket hailo-devmgr-ollama.service"):
        assert line in lines, line
    # In this order: the YAML is checked before the device is borrowed, and given back after any stop.
    pre = [line for line in lines if line.startswith("ExecStartPre=")]
    assert pre == ["ExecStartPre=+/usr/bin/hailo-ollama-config --apply",
                   "ExecStartPre=+hailo-devmgr lend --to hailo-ollama.service --wait 30"]
    assert [line for line in lines if line.startswith("ExecStopPost=")] == ["ExecStopPost=+hailo-devmgr reclaim"]
    sysusers = (tmp_path / "usr/lib/sysusers.d/hailo-ollama-service.conf").read_text().splitlines()
    assert "m hailo-ollama hailo" in sysusers and any(line.startswith("u hailo-ollama ") for line in sysusers)


def test_ollama_packaged_template_renders_the_issues_json(debs, tmp_path):
    run("dpkg-deb", "-x", str(debs[OLLAMA_PACKAGE]), str(tmp_path))
    [module] = (tmp_path / "usr/lib").glob("python3*/dist-packages/hailo_devmgr/ollama_service.py")
    output = tmp_path / "out" / "hailo-ollama.json"
    run("/usr/bin/python3", str(module), "--config", str(tmp_path / "etc/hailo/hailo-ollama.yaml"),
        "--output", str(output))
    assert json.loads(output.read_text()) == {"server": {"host": "0.0.0.0", "port": 11434},
                                              "library": {"host": "dev-public.hailo.ai", "port": 443},
                                              "main_poll_time_ms": 200}


def test_ollama_maintainer_scripts_never_enable_or_start_it(debs):
    deb = debs[OLLAMA_PACKAGE]
    postinst = control_file(deb, "postinst")
    assert "deb-systemd-helper --quiet was-enabled 'hailo-ollama.service'" in postinst  # enabled only if it was
    assert "deb-systemd-invoke start" not in postinst and "deb-systemd-invoke restart" not in postinst
    assert "deb-systemd-invoke try-restart 'hailo-ollama.service'" in postinst  # upgrade: only if running
    assert "systemd-sysusers" in postinst and "systemd-tmpfiles" in postinst
    prerm = control_file(deb, "prerm")
    before_stop = prerm.split("deb-systemd-invoke stop 'hailo-ollama.service'")
    assert len(before_stop) == 2 and '[ "$1" = remove ]' in before_stop[0].rstrip().splitlines()[-1]


@needs_root
def test_ollama_install_warns_without_the_binary_and_purge_keeps_models_and_user(debs, clean_system, tmp_path):
    binary = Path("/usr/bin/hailo-ollama")
    if binary.exists():
        pytest.skip("Hailo's hailo-ollama is installed on this machine: the warning cannot be seen")
    result = dpkg_install(debs["python3-hailo-devmgr"], debs["hailo-device-manager"], debs[OLLAMA_PACKAGE])
    output = result.stdout + result.stderr
    assert ("hailo-ollama-service: warning: /usr/bin/hailo-ollama not found: install Hailo's "
            "hailo-gen-ai-model-zoo package") in output  # a warning, not a failure
    data = Path("/var/lib/hailo-ollama")
    try:
        assert "hailo-ollama" in grp.getgrnam("hailo").gr_mem  # for /dev/hailo*
        assert pwd.getpwnam("hailo-ollama").pw_shell == "/usr/sbin/nologin"
        assert pwd.getpwuid((data / "models").stat().st_uid).pw_name == "hailo-ollama"
        assert os.readlink(data / "models" / "manifests") == "/usr/share/hailo-ollama/models/manifests"
        assert not Path("/etc/systemd/system/multi-user.target.wants/hailo-ollama.service").exists()
        rendered = run("/usr/bin/hailo-ollama-config")  # by hand, as root: the default paths
        assert "wrote /etc/xdg/hailo-ollama/hailo-ollama.json" in rendered.stdout
        (data / "models" / "blob").mkdir(exist_ok=True)
        (data / "models" / "blob" / "sha256_test").write_text("a pulled model")
        run("dpkg", "--remove", OLLAMA_PACKAGE)
        assert Path("/etc/hailo/hailo-ollama.yaml").exists()  # remove keeps the configuration
        run("dpkg", "--purge", OLLAMA_PACKAGE)
        assert not Path("/etc/hailo/hailo-ollama.yaml").exists()
        assert not Path("/etc/xdg/hailo-ollama").exists()  # the generated JSON and its folder
        assert (data / "models" / "blob" / "sha256_test").read_text() == "a pulled model"  # models stay
        assert pwd.getpwnam("hailo-ollama")  # the user stays, as Debian does
        assert Path("/etc/hailo/device-manager.yaml").exists()  # the daemon's package untouched
    finally:
        run("rm", "-rf", str(data), "/etc/xdg/hailo-ollama")


def test_stdeb_builds_a_client_package_that_imports(tmp_path):
    run("make", "-C", str(ROOT), "stdeb", f"DEB_DIR={tmp_path}", env={**SYSTEM_ENV, "HOME": str(tmp_path)},
        timeout=600)
    [deb] = (tmp_path / "stdeb" / "deb_dist").glob("*.deb")
    assert field(deb, "Package") == "python3-hailo-devmgr-plain"
    assert set(field(deb, "Conflicts").replace(" ", "").split(",")) == set(PACKAGES)
    run("dpkg-deb", "-x", str(deb), str(tmp_path / "root"))
    [site] = (tmp_path / "root" / "usr" / "lib").glob("python3*/dist-packages")
    run("/usr/bin/python3", "-c", "import hailo_devmgr.client as c; print(c.Client)",
        env={**SYSTEM_ENV, "PYTHONPATH": str(site)}, cwd=str(tmp_path))


# ------------------------------------------------------------------ the Ollama/OpenAI gateway (issue 17)

def test_gateway_units_and_catalog_are_shipped_and_not_enabled(debs):
    deb = debs["hailo-device-manager"]
    listing = contents(deb).replace("./usr/lib/systemd/", "./lib/systemd/")
    for path in ("./lib/systemd/system/hailo-devmgr-ollama.socket",
                 "./lib/systemd/system/hailo-devmgr-ollama.service",
                 "./etc/hailo/models.yaml", "/dist-packages/hailo_devmgr/http/ollama.py",
                 "/dist-packages/hailo_devmgr/http/openai.py",
                 "./usr/share/doc/hailo-device-manager/ollama-openai.md"):
        assert path in listing, path
    assert "/etc/hailo/models.yaml" in control_file(deb, "conffiles").split()
    assert "python3-pil" in field(deb, "Depends")   # images to VLM frames
    postinst = control_file(deb, "postinst")
    # Port 11434 may be Ollama's or hailo-ollama's: never enabled or started by the package,
    # only re-enabled on upgrade when the admin had enabled it.
    lines = postinst.splitlines()
    for number, line in enumerate(lines):
        if "deb-systemd-helper enable 'hailo-devmgr-ollama" in line:
            assert "was-enabled 'hailo-devmgr-ollama.socket'" in "\n".join(lines[max(0, number - 3):number])
    assert "deb-systemd-invoke start 'hailo-devmgr-ollama" not in postinst
    assert not [line for line in lines if "hailo-devmgr-ollama.socket" in line and "restart" in line]


def test_gateway_units_follow_the_port_rule():
    """docs/hailo-ollama.md, "Port 11434": hailo-ollama.service conflicts with both units,
    the service stops with its socket, the socket's descriptor is the one named ollama."""
    socket_unit = (ROOT / "systemd" / "hailo-devmgr-ollama.socket").read_text()
    service = (ROOT / "systemd" / "hailo-devmgr-ollama.service").read_text()
    assert "ListenStream=127.0.0.1:11434\n" in socket_unit and "FileDescriptorName=ollama\n" in socket_unit
    assert "BindsTo=hailo-devmgr-ollama.socket\n" in service and "ExecStart=/usr/bin/hailo-devmgr-http\n" in service
    assert "\n[Install]" not in service and "User=hailo-devmgr-http\n" in service
    conflicts = (ROOT / "systemd" / "hailo-ollama.service").read_text()
    assert "Conflicts=hailo-devmgr-ollama.socket hailo-devmgr-ollama.service\n" in conflicts
    assert "\nConflicts=" not in service and "\nConflicts=" not in socket_unit   # declared once, on one side
