"""Lending the whole device to another program, and taking it back.

Some programs must open the accelerator themselves (Hailo's hailo-ollama,
hailortcli, a firmware update). ``lend`` (admins only) releases every model
and the VDevice, so the borrower can open it; until ``reclaim``, device
requests are answered ``device_lent`` naming the borrower, while ping and
status go on. ``reclaim`` reopens the device (or keeps trying on demand
while the borrower still holds it) and pre-loads the pinned models again.

The loan is written to a small file in the daemon's runtime directory
(``$RUNTIME_DIRECTORY``, /run/hailo-device-manager under systemd, kept
across restarts of the service and gone at reboot), so a daemon restarted
during a loan neither takes the device back nor forgets it is lent.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

from ..wire import protocol as p
from ..wire.protocol import RequestError

log = logging.getLogger(__name__)

STATE_FILE = "lent.json"
MAX_BORROWER_CHARS = 128
RETRY_AFTER_MS = 5000


@dataclass(frozen=True)
class Loan:
    to: str
    since: float   # Unix time


def state_path(configured: str | None) -> str | None:
    """Where the loan is kept: the configured file, else systemd's runtime
    directory; None (memory only) when there is neither."""
    if configured:
        return configured
    runtime_dir = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime_dir, STATE_FILE) if runtime_dir else None


def load(path: str | None) -> Loan | None:
    """The loan a previous run of the daemon left, if any."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
        return Loan(str(data["to"])[:MAX_BORROWER_CHARS], float(data["since"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # Unreadable: the safe side is "lent" (never take a device someone may hold).
        log.error("the loan file %s is unreadable (%s): the device stays lent until reclaim", path, exc)
        return Loan("unknown (unreadable loan file)", time.time())


def save(path: str | None, loan: Loan | None) -> None:
    if not path:
        return
    try:
        if loan is None:
            os.unlink(path)
            return
        temporary = f"{path}.new"
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump({"to": loan.to, "since": loan.since}, file)
        os.replace(temporary, path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not record the loan in %s (%s): a restart would forget it", path, exc)


def borrower(body: dict) -> str:
    """The ``to`` field of a lend request: who borrows the device (shown to every client)."""
    name = body.get("to")
    if not isinstance(name, str) or not name.strip():
        raise RequestError(p.BAD_REQUEST, "lend needs to: the name of the borrower (e.g. a unit name)")
    if len(name) > MAX_BORROWER_CHARS or not name.isprintable():
        raise RequestError(p.BAD_REQUEST, f"to must be at most {MAX_BORROWER_CHARS} printable characters")
    return name.strip()


def lent_error(loan: Loan) -> RequestError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(loan.since))
    return RequestError(p.DEVICE_LENT, f"The device is lent to {loan.to} (since {since}); it comes back "
                                       f"with `hailo-devmgr reclaim`", retry_after_ms=RETRY_AFTER_MS)
