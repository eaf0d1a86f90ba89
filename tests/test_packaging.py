"""The Debian packages: build, lintian, contents, and install/upgrade/purge with dpkg.

The build runs `make deb` (dpkg-buildpackage -us -uc -b) once per session.
Install tests change this machine (as a chroot would see it: no systemd
running, so maintainer scripts must cope) and purge what they installed.
"""
from __future__ import annotations

import grp
import os
import pwd
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from packages import OLD_VERSION, PACKAGES, ROOT, SYSTEM_ENV, run
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
    assert "/dist-packages/hailo_devmgr/daemon/server.py" in listing
    assert "/dist-packages/hailo_devmgr/client/" not in listing and "/hailo_devmgr/wire/" not in listing
    assert field(deb, "Architecture") == "all"
    depends = field(deb, "Depends")
    for name in ("python3-systemd", "python3-yaml", "python3-hailo-devmgr"):
        assert name in depends
    assert "sdnotify" not in depends  # sd_notify is sent by the daemon itself (systemd.py)
    assert "hailort" not in depends  # never a hard dependency
    assert "python3-h10-hailort | python3-hailort" in field(deb, "Recommends")
    assert control_file(deb, "conffiles").split() == ["/etc/hailo/device-manager.yaml"]


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
    run("dpkg", "--purge", *PACKAGES, check=False, timeout=300)


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
