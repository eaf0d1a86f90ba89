"""Everything the daemon says to or takes from systemd.

- the listening socket handed over by ``hailo-device-manager.socket``
  (``LISTEN_FDS``, read with python3-systemd, plain environment fallback);
- sd_notify messages (READY, STATUS, WATCHDOG, STOPPING, RELOADING) through
  sdnotify;
- logging: journald with structured fields when stderr is the journal,
  plain lines on stderr otherwise.
"""
from __future__ import annotations

import logging
import os
import socket
import sys

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3


class SystemdError(Exception):
    """systemd handed us something we cannot use."""


# ------------------------------------------------------------ socket activation

def inherited_sockets(environ=None) -> list[int]:
    """File descriptors passed by socket activation ([] when started by hand).

    Removes LISTEN_* from the environment so children do not inherit them.
    """
    environ = os.environ if environ is None else environ
    try:
        from systemd import daemon
    except ImportError:  # python3-systemd missing: read the protocol ourselves
        daemon = None
    if daemon is not None and environ is os.environ:
        return daemon.listen_fds(unset_environment=True)
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    return list(range(LISTEN_FDS_START, LISTEN_FDS_START + count))


def adopt_listener(fds: list[int]) -> socket.socket:
    """The one Unix stream socket systemd gave us; anything else is an error."""
    if len(fds) != 1:
        raise SystemdError(f"expected exactly one socket from systemd, got {len(fds)} "
                           "(check ListenStream= in hailo-device-manager.socket)")
    sock = socket.socket(fileno=fds[0])
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise SystemdError("the socket from systemd is not a Unix stream socket")
    sock.setblocking(False)
    return sock


# ------------------------------------------------------------ sd_notify

def _notifier():
    """sdnotify's notifier; python3-systemd's notify() if sdnotify is absent."""
    try:
        import sdnotify
        return sdnotify.SystemdNotifier()
    except ImportError:
        from systemd import daemon

        class _Systemd:
            @staticmethod
            def notify(text: str) -> None:
                daemon.notify(text)
        return _Systemd()


class Notifier:
    """sd_notify through sdnotify; silent when NOTIFY_SOCKET is not set."""

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._notifier = None
        if self.enabled:
            self._notifier = _notifier()
        self._last_status: str | None = None
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        self.watchdog_usec = int(usec) if usec and usec.isdigit() and (
            not pid or pid == str(os.getpid())) else 0

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """Send STATUS= only when the text changed."""
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=Stopping")

    def reloading(self) -> None:
        self.send("RELOADING=1", "STATUS=Reloading configuration")

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half of WatchdogSec, as sd_watchdog_enabled(3) advises; None if off."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None


# ------------------------------------------------------------ logging

class PlainFormatter(logging.Formatter):
    """One line per event; structured fields appended as KEY=value."""

    FIELDS = ("MODEL", "MODEL_TYPE", "REQUEST_ID", "CLIENT_PID", "CLIENT_UID", "DURATION_MS", "CODE")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = [f"{name}={getattr(record, name)}" for name in self.FIELDS if hasattr(record, name)]
        return f"{line} [{' '.join(extra)}]" if extra else line


def _stderr_is_journal(environ) -> bool:
    """True when systemd connected stderr to journald (JOURNAL_STREAM matches)."""
    stream = environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return info.st_dev == device and info.st_ino == inode


def setup_logging(level: str, environ=None) -> None:
    environ = os.environ if environ is None else environ
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler | None = None
    if _stderr_is_journal(environ):
        try:
            from systemd.journal import JournalHandler
            handler = JournalHandler(SYSLOG_IDENTIFIER="hailo-device-manager")
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
