"""``hailo-devmgr-http``: the device manager's status and metrics, and the
Ollama- and OpenAI-compatible gateway, over HTTP.

Listeners, in this order:

- socket-activated: exactly the sockets systemd passes. One named
  ``ollama`` (``FileDescriptorName=ollama`` in hailo-devmgr-ollama.socket)
  serves the gateway; any other (hailo-devmgr-http.socket) the status and
  metrics. So hailo-devmgr-http.service serves the status only, as before,
  and hailo-devmgr-ollama.service the gateway only; each stops with its socket.
- started by hand: ``--listen-status HOST:PORT`` (127.0.0.1:5099, where the
  earlier daemon served its status) and ``--listen-ollama HOST:PORT``
  (127.0.0.1:11434, Ollama's port): the ones named on the command line,
  or both when neither is.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from aiohttp import web

from ..client import default_socket_path
from ..daemon.systemd import Notifier, inherited_sockets, setup_logging
from .app import create_app
from .catalog import DEFAULT_CATALOG
from .gateway_app import create_gateway_app

DEFAULT_LISTEN = "127.0.0.1:5099"
DEFAULT_LISTEN_OLLAMA = "127.0.0.1:11434"
# The FileDescriptorName= of hailo-devmgr-ollama.socket.
OLLAMA_FD_NAME = "ollama"
log = logging.getLogger("hailo_devmgr.http")


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"want HOST:PORT, e.g. {DEFAULT_LISTEN}, got {text!r}")
    return host.strip("[]"), number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hailo-devmgr-http", description=__doc__.split("\n")[0])
    parser.add_argument("--device-socket", default=None, metavar="PATH",
                        help=f"the device manager's socket (default $HAILO_DEVICE_SOCKET or {default_socket_path()})")
    parser.add_argument("--listen-status", type=_host_port, default=None, metavar="HOST:PORT",
                        help=f"status and metrics, when not socket-activated ({DEFAULT_LISTEN})")
    parser.add_argument("--listen-ollama", type=_host_port, default=None, metavar="HOST:PORT",
                        help=f"the Ollama and OpenAI API, when not socket-activated ({DEFAULT_LISTEN_OLLAMA})")
    parser.add_argument("--catalog", default=DEFAULT_CATALOG, metavar="PATH",
                        help=f"the gateway's model catalog (default {DEFAULT_CATALOG})")
    return parser


def _bound(address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    return sock


def _listening_sockets(args) -> list[tuple[str, socket.socket]]:
    """[("status" | "ollama", socket)]: systemd's, by name, else bound as the arguments say."""
    names = []
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")   # read before inherited_sockets() drops it
    inherited = inherited_sockets()
    if inherited:
        roles = ["ollama" if index < len(names) and names[index] == OLLAMA_FD_NAME else "status"
                 for index in range(len(inherited))]
        if roles.count("status") > 1 or roles.count("ollama") > 1:
            raise SystemExit(f"hailo-devmgr-http: expected at most one status and one ollama socket from systemd, "
                             f"got {len(inherited)} (check ListenStream= in hailo-devmgr-http.socket and "
                             "hailo-devmgr-ollama.socket)")
        return [(role, socket.socket(fileno=fd)) for role, fd in zip(roles, inherited)]
    wanted = {"status": args.listen_status, "ollama": args.listen_ollama}
    if not any(wanted.values()):
        wanted = {"status": _host_port(DEFAULT_LISTEN), "ollama": _host_port(DEFAULT_LISTEN_OLLAMA)}
    sockets = []
    try:
        for role, address in wanted.items():
            if address:
                sockets.append((role, _bound(address)))
    except OSError:
        for _, sock in sockets:
            sock.close()
        raise
    return sockets


async def serve(args) -> None:
    device_socket = args.device_socket or default_socket_path()
    runners, served = [], []
    for role, sock in _listening_sockets(args):
        if role == "ollama":
            app, what = create_gateway_app(device_socket, args.catalog), "the Ollama and OpenAI API"
        else:
            app, what = create_app(device_socket), "/v1/device/status and /metrics"
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        runners.append(runner)
        host, port = sock.getsockname()[:2]
        log.info("serving %s on %s:%s", what, host, port)
        served.append(f"{role} on {host}:{port}")
    notifier = Notifier()
    notifier.ready(f"serving {', '.join(served)}")
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    notifier.stopping()
    for runner in runners:
        await runner.cleanup()


def main(argv=None) -> int:
    setup_logging("info")
    args = build_parser().parse_args(argv)
    try:
        asyncio.run(serve(args))
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
