"""``hailo-devmgr-http``: serve the device manager's status and metrics over HTTP.

The listening socket comes from systemd when socket-activated
(hailo-devmgr-http.socket, one stream socket in LISTEN_FDS), else it is
bound to ``--listen-status HOST:PORT`` (default 127.0.0.1:5099, where the
earlier daemon served its status).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys

from aiohttp import web

from ..client import default_socket_path
from ..daemon.systemd import Notifier, inherited_sockets, setup_logging
from .app import create_app

DEFAULT_LISTEN = "127.0.0.1:5099"
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
    parser.add_argument("--listen-status", type=_host_port, default=_host_port(DEFAULT_LISTEN),
                        metavar="HOST:PORT", help=f"where to listen when not socket-activated ({DEFAULT_LISTEN})")
    return parser


def _listening_socket(args) -> socket.socket:
    inherited = inherited_sockets()
    if len(inherited) > 1:
        raise SystemExit(f"hailo-devmgr-http: expected one socket from systemd, got {len(inherited)} "
                         "(check ListenStream= in hailo-devmgr-http.socket)")
    if inherited:
        return socket.socket(fileno=inherited[0])
    host, port = args.listen_status
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


async def serve(args) -> None:
    sock = _listening_socket(args)
    runner = web.AppRunner(create_app(args.device_socket or default_socket_path()), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    log.info("serving /v1/device/status and /metrics on %s:%s", host, port)
    notifier = Notifier()
    notifier.ready(f"serving on {host}:{port}")
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    notifier.stopping()
    await runner.cleanup()


def main(argv=None) -> int:
    setup_logging("info")
    args = build_parser().parse_args(argv)
    try:
        asyncio.run(serve(args))
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", *args.listen_status, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
