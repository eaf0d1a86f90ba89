"""``hailo-devmgr lend``, ``reclaim`` and ``exclusive``: hand the whole device to
another program (Hailo's hailo-ollama, hailortcli, a firmware update) and
take it back. Admins only (root, the daemon's user, config ``admin``)."""
from __future__ import annotations

import os
import subprocess
import sys

from ..client import Client

EXIT_CANNOT_RUN, EXIT_NOT_FOUND = 126, 127


def lend(client: Client, borrower: str, wait_s: float) -> dict:
    """Ask the daemon to release the device for ``borrower``; it waits up to
    ``wait_s`` for the running work to finish."""
    return client.request("lend", to=borrower, timeout_ms=max(1, int(wait_s * 1000)))


def reclaim(client: Client) -> dict:
    return client.request("reclaim")


def exclusive(client_factory, command: list[str], borrower: str | None, wait_s: float) -> int:
    """Lend the device to ``command``, run it, and always take the device back.
    Returns the command's exit status."""
    name = borrower or f"hailo-devmgr exclusive ({os.path.basename(command[0])}, pid {os.getpid()})"
    with client_factory() as client:
        lend(client, name, wait_s)
    try:
        try:
            return subprocess.call(command)
        except FileNotFoundError:
            print(f"hailo-devmgr: {command[0]}: command not found", file=sys.stderr)
            return EXIT_NOT_FOUND
        except PermissionError:
            print(f"hailo-devmgr: {command[0]}: permission denied", file=sys.stderr)
            return EXIT_CANNOT_RUN
    finally:
        with client_factory() as client:
            answer = reclaim(client)
        print(f"hailo-devmgr: {answer.get('message', 'device reclaimed')}", file=sys.stderr)
