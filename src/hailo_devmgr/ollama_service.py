"""hailo-ollama-config: the operator's YAML for Hailo's hailo-ollama, rendered for it.

Hailo's ``hailo-ollama`` (package hailo-gen-ai-model-zoo, binary
/usr/bin/hailo-ollama) reads one JSON file, found through the XDG lookup
(upstream hailo_model_zoo_genai v5.1.1, src/apps/server/main.cpp
``find_dir``/``find_config_dir``: the first existing ``hailo-ollama`` folder
in $XDG_CONFIG_HOME, then each of $XDG_CONFIG_DIRS; file name
``hailo-ollama.json`` from src/library/utils/path.hpp ``HAILO_CONFIG_NAME``).
Its schema is src/library/config/runtime_config.hpp: ``server`` and
``library`` each ``{host: string, port: uint16}`` and ``main_poll_time_ms:
uint16``, every key required. hailo-ollama.service sets XDG_CONFIG_HOME to
/etc/xdg, so the file is /etc/xdg/hailo-ollama/hailo-ollama.json.

The operator edits /etc/hailo/hailo-ollama.yaml instead. This module checks
it (one line naming the key at fault, exit 1), writes the JSON atomically,
and, with --apply (the unit's ExecStartPre, as root), sets the YAML's
resource limits on the unit with ``systemctl set-property --runtime``: that
applies them to the starting service's own cgroup at once and leaves
systemd's runtime drop-ins under /run/systemd/system.control, where a drop-in
file of our own would only count after a daemon-reload, i.e. from the next
start. --verify asks the running server.

Standalone on purpose: the standard library and yaml only, so the daemon's
request path can change without touching this.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

PROG = "hailo-ollama-config"
UNIT = "hailo-ollama.service"
DEFAULT_CONFIG = "/etc/hailo/hailo-ollama.yaml"
DEFAULT_OUTPUT = "/etc/xdg/hailo-ollama/hailo-ollama.json"
# Upstream's CMake installs the server with install(TARGETS ... RUNTIME
# DESTINATION ${CMAKE_INSTALL_BINDIR}) (src/apps/server/CMakeLists.txt).
BINARY = "/usr/bin/hailo-ollama"
PROVIDER = "hailo-gen-ai-model-zoo"
JOURNAL_HINT = "journalctl -u hailo-ollama -n 100"

# Named exit statuses. 1 is what ExecCondition= reads as "skip, not failed".
EXIT_OK = 0
EXIT_INVALID = 1        # the YAML is wrong, the binary is missing, or --verify failed
EXIT_USAGE = 2          # argparse's own
EXIT_SYSTEM = 3         # cannot write the JSON, or systemctl refused the limits
EXIT_PORT_BUSY = 4      # something else already answers on the configured port

# The template's values (etc/hailo/hailo-ollama.yaml): also what a key left out means.
DEFAULTS = {
    "server": {"host": "0.0.0.0", "port": 11434},
    "library": {"host": "dev-public.hailo.ai", "port": 443},
    "main_poll_time_ms": 200,
    "resource_limits": {"memory_max": "4G", "cpu_quota": "80%"},
}
MIN_MEMORY_BYTES = 1 << 20
UINT16_MAX = 65535
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_MEMORY = re.compile(r"^([0-9]+)([KMGT]?)$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_QUOTA = re.compile(r"^([0-9]+)%$")


class ConfigError(Exception):
    """A wrong value in the YAML: the message names the key, e.g. ``server.port: ...``."""


class Failure(Exception):
    """Something outside the YAML went wrong; carries the exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------ validation

def _mapping(value, key: str, allowed: tuple[str, ...]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping with keys {', '.join(allowed)}, got {value!r}")
    unknown = sorted(str(name) for name in value if name not in allowed)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (allowed: {', '.join(allowed)})")
    return value


def _integer(value, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{key}: must be an integer from {low} to {high}, got {value!r}")
    return value


def _host(value, key: str, *, ipv4_only: bool) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a host name or IP address, got {value!r}")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        address = None
    if address is not None:
        if ipv4_only and address.version != 4:
            # app_component.hpp: the listener is created with Address::IP_4.
            raise ConfigError(f"{key}: hailo-ollama listens on IPv4 only, got {value!r}")
        return value
    name = value[:-1] if value.endswith(".") else value
    if (len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split("."))
            or re.fullmatch(r"[0-9.]+", name)):
        raise ConfigError(f"{key}: not a valid host name or IP address: {value!r}")
    return value


def _memory_max(value, key: str) -> str:
    """systemd's MemoryMax= syntax, restricted to bytes or a K/M/G/T suffix (base 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip().upper()
    else:
        text = None
    match = _MEMORY.match(text) if text is not None else None
    if match is None:
        raise ConfigError(f"{key}: must be bytes or a size like \"4G\" or \"512M\", got {value!r}")
    number, unit = match.groups()
    if int(number) * _UNITS[unit] < MIN_MEMORY_BYTES:
        raise ConfigError(f"{key}: at least 1M, got {value!r}")
    return f"{int(number)}{unit}"


def _cpu_quota(value, key: str, cpus: int) -> str:
    match = _QUOTA.match(value.strip()) if isinstance(value, str) else None
    high = cpus * 100
    if match is None or not 1 <= int(match.group(1)) <= high:
        raise ConfigError(f"{key}: must be a percentage from \"1%\" to \"{high}%\" "
                          f"({cpus} CPU(s) here), got {value!r}")
    return f"{int(match.group(1))}%"


def validate(data, cpus: int | None = None) -> dict:
    """The YAML's content, checked and completed with the defaults; raises ConfigError."""
    cpus = cpus or os.cpu_count() or 1
    top = _mapping(data, "", tuple(DEFAULTS))
    result = {}
    for section in ("server", "library"):
        given = _mapping(top.get(section), section, ("host", "port"))
        result[section] = {
            "host": _host(given.get("host", DEFAULTS[section]["host"]), f"{section}.host",
                          ipv4_only=section == "server"),
            "port": _integer(given.get("port", DEFAULTS[section]["port"]), f"{section}.port", 1, UINT16_MAX),
        }
    # uint16_t in upstream's RuntimeConfig; 0 would make its main loop spin.
    result["main_poll_time_ms"] = _integer(top.get("main_poll_time_ms", DEFAULTS["main_poll_time_ms"]),
                                           "main_poll_time_ms", 1, UINT16_MAX)
    limits = _mapping(top.get("resource_limits"), "resource_limits", ("memory_max", "cpu_quota"))
    result["resource_limits"] = {
        "memory_max": _memory_max(limits.get("memory_max", DEFAULTS["resource_limits"]["memory_max"]),
                                  "resource_limits.memory_max"),
        "cpu_quota": _cpu_quota(limits.get("cpu_quota", DEFAULTS["resource_limits"]["cpu_quota"]),
                                "resource_limits.cpu_quota", cpus),
    }
    return result


def load(path: str, cpus: int | None = None) -> dict:
    """Read and validate the YAML file; every problem is a ConfigError of one line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read: {getattr(error, 'strerror', None) or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"not valid YAML: {problem}{where}") from None
    return validate(data, cpus)


# ------------------------------------------------------------------ rendering

def upstream_json(config: dict) -> str:
    """hailo-ollama's own file: exactly its three keys, in its order."""
    document = {
        "server": {"host": config["server"]["host"], "port": config["server"]["port"]},
        "library": {"host": config["library"]["host"], "port": config["library"]["port"]},
        "main_poll_time_ms": config["main_poll_time_ms"],
    }
    return json.dumps(document, indent=4) + "\n"


def limit_properties(config: dict) -> list[str]:
    """The unit properties the YAML's resource_limits stand for."""
    limits = config["resource_limits"]
    return [f"MemoryMax={limits['memory_max']}", f"CPUQuota={limits['cpu_quota']}"]


def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` in one rename: hailo-ollama never reads half a file."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fchmod(stream.fileno(), mode)
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def apply_limits(config: dict, unit: str = UNIT) -> None:
    """Set the limits on the unit now (its cgroup) and until reboot (systemd's runtime drop-ins)."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        raise Failure("systemctl not found: cannot set the resource limits", EXIT_SYSTEM)
    result = subprocess.run([systemctl, "set-property", "--runtime", unit, *limit_properties(config)],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise Failure(f"systemctl set-property {unit} failed: {reason}", EXIT_SYSTEM)


def probe_host(host: str) -> str:
    """Where to connect for a server listening on ``host`` (any address: this host)."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((probe_host(host), port), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------ verify

def _get_json(url: str, timeout: float):
    with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 (http to our own server)
        return json.loads(answer.read().decode("utf-8"))


def verify(config: dict, wait_s: float, unit: str = UNIT) -> str:
    """One line saying the service works, or Failure saying what does not."""
    systemctl = shutil.which("systemctl")
    state = "unknown"
    if systemctl is not None:
        state = subprocess.run([systemctl, "is-active", unit], capture_output=True, text=True,
                               timeout=30).stdout.strip() or "unknown"
    if state != "active":
        raise Failure(f"{unit} is {state}, not active (start it: systemctl enable --now hailo-ollama)",
                      EXIT_INVALID)
    base = f"http://{probe_host(config['server']['host'])}:{config['server']['port']}"
    deadline = time.monotonic() + wait_s
    while True:  # a server just started may need a moment before it listens
        try:
            version = _get_json(f"{base}/api/version", timeout=5)
            break
        except (OSError, ValueError) as error:
            if time.monotonic() >= deadline:
                raise Failure(f"GET {base}/api/version failed: {_reason(error)}", EXIT_INVALID) from None
            time.sleep(0.5)
    try:
        tags = _get_json(f"{base}/api/tags", timeout=10)
    except (OSError, ValueError) as error:
        raise Failure(f"GET {base}/api/tags failed: {_reason(error)}", EXIT_INVALID) from None
    if not isinstance(version, dict) or "version" not in version:
        raise Failure(f"GET {base}/api/version: no \"version\" in the answer", EXIT_INVALID)
    if not isinstance(tags, dict) or not isinstance(tags.get("models"), list):
        raise Failure(f"GET {base}/api/tags: no \"models\" list in the answer", EXIT_INVALID)
    return (f"{unit} is active; {base} answers: version {version['version']}, "
            f"{len(tags['models'])} model(s)")


def _reason(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


# ------------------------------------------------------------------ command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check /etc/hailo/hailo-ollama.yaml and write hailo-ollama's JSON configuration; "
                    "with --apply also set the YAML's resource limits on hailo-ollama.service; "
                    "with --verify check that the running service answers.")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"the YAML to read (default {DEFAULT_CONFIG})")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help=f"hailo-ollama's JSON to write (default {DEFAULT_OUTPUT})")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="only check the YAML; write nothing")
    action.add_argument("--apply", action="store_true",
                        help="as the unit's ExecStartPre: write the JSON, refuse a port already in use, "
                             "set MemoryMax= and CPUQuota= on the unit (root)")
    action.add_argument("--verify", action="store_true",
                        help="check that the unit is active and answers GET /api/version and /api/tags")
    action.add_argument("--check-binary", action="store_true",
                        help=f"exit 1 saying which package to install when {BINARY} is missing "
                             "(the unit's ExecCondition)")
    parser.add_argument("--wait", type=float, default=10.0, metavar="S",
                        help="--verify: how long the server may take to answer (default 10 s)")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    return parser.parse_args(argv)


def _version() -> str:
    try:
        from hailo_devmgr._version import __version__
        return __version__
    except Exception:  # the version is a nicety; never a reason to fail
        return "unknown"


def run(args: argparse.Namespace) -> str:
    """Do what ``args`` ask; returns the line to print, raises ConfigError or Failure."""
    if args.check_binary:
        if not os.access(BINARY, os.X_OK):
            raise Failure(f"{BINARY} not found: install Hailo's {PROVIDER} package (Hailo Developer Zone, "
                          f"or Raspberry Pi's apt repository); {UNIT} does not start without it", EXIT_INVALID)
        return f"{BINARY} is installed"
    config = load(args.config)
    if args.check:
        return f"{args.config}: OK"
    if args.verify:
        return verify(config, args.wait)
    if args.apply and port_answers(config["server"]["host"], config["server"]["port"]):
        raise Failure(f"port {config['server']['port']} is already in use by another server (an Ollama, "
                      f"or hailo-devmgr's Ollama gateway?): stop it, or set server.port in {args.config}",
                      EXIT_PORT_BUSY)
    try:
        write_atomically(Path(args.output), upstream_json(config))
    except OSError as error:
        raise Failure(f"cannot write {args.output}: {error.strerror or error}", EXIT_SYSTEM) from None
    if args.apply:
        apply_limits(config)
        return f"wrote {args.output}; {UNIT}: {' '.join(limit_properties(config))}"
    return (f"wrote {args.output} (resource limits apply at the next start: "
            f"systemctl restart hailo-ollama)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        line = run(args)
    except ConfigError as error:
        print(f"{PROG}: {args.config}: {error}", file=sys.stderr)
        return EXIT_INVALID
    except Failure as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        if args.verify:
            print(f"{PROG}: see what hailo-ollama said: {JOURNAL_HINT}", file=sys.stderr)
        return error.status
    print(line, file=sys.stderr if args.apply or args.check_binary else sys.stdout)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
