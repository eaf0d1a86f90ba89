"""Everything the daemon says to or takes from systemd.

- the listening socket handed over by ``hailo-device-manager.socket``
  (``LISTEN_FDS``, read with python3-systemd, plain environment fallback);
- sd_notify messages (READY, STATUS, WATCHDOG, STOPPING, RELOADING), sent
  by us as sd_notify(3) does: one datagram to ``NOTIFY_SOCKET``;
- logging: journald with structured fields when stderr is the journal,
  plain lines on stderr otherwise; every record bounded in size.

Client text reaches both (an error quoting a path, a request_id), so both
make whatever text they get safe: bounded, on one line, and encodable.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time

from ..wire.protocol import clipped

log = logging.getLogger(__name__)

MAX_STATUS_CHARS = 200     # systemctl status shows one line
MAX_LOG_CHARS = 2048       # a log message, whoever wrote it and whatever it quotes
MAX_LOG_FIELD_CHARS = 256  # a structured field (REQUEST_ID, CLIENT, MODEL ...)
LINE_BYTES = 256           # a log line about a client costs one per started LINE_BYTES

# C0 controls and DEL as escapes: a newline in a STATUS= would start an
# assignment of the client's choosing (READY=1, MAINPID=), and in a plain log
# line a forged line.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7f)}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def one_line(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, on one line, and encodable as UTF-8
    (a lone surrogate from a JSON escape is not)."""
    line = clipped(text, limit).translate(_CONTROLS)
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


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

class Notifier:
    """sd_notify; silent when NOTIFY_SOCKET is not set.

    Not through sdnotify: it encodes as latin-1 and drops the whole datagram,
    silently, when a character does not fit, so one client's "€" in a STATUS
    took the READY=1 beside it along (and a reload then hung under
    Type=notify). Here every text is made safe before it is sent, and a
    failure to send is logged."""

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or ""
        self.enabled = bool(address)
        # "@name" is an abstract socket, as in sd_notify(3).
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) \
            if self.enabled else None
        self._failing = False
        self._last_status: str | None = None
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        self.watchdog_usec = int(usec) if usec and usec.isdigit() and (
            not pid or pid == str(os.getpid())) else 0

    def send(self, *lines: str) -> None:
        """One datagram of ``KEY=value`` lines (made safe by the caller: see :meth:`status`)."""
        if self._socket is None:
            return
        datagram = "\n".join(lines).encode("utf-8", "backslashreplace")
        try:
            # Not connected: a datagram still arrives after systemd re-created its socket.
            self._socket.sendto(datagram, self._address)
        except OSError as exc:
            if not self._failing:  # once per spell of failures, not once a second
                log.warning("cannot notify systemd at %s: %s", self._address, exc)
            self._failing = True
        else:
            self._failing = False

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", self._status_line(status))

    def status(self, status: str) -> None:
        """Send STATUS= only when the text changed."""
        if status != self._last_status:
            self._last_status = status
            self.send(self._status_line(status))

    @staticmethod
    def _status_line(status: str) -> str:
        """Whatever ``status`` holds, one ``STATUS=`` line that cannot fail to
        send or add an assignment of its own."""
        return f"STATUS={one_line(status, MAX_STATUS_CHARS)}"

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


class BoundedRecords(logging.Filter):
    """Every record of every logger cut to a bounded size before a handler sees
    it: a log line may quote client text (an action name, a path, a request_id),
    and 60 MB of it per request must not reach the disk, nor a forged line
    (message on one line; the traceback, the daemon's own, keeps its lines).

    Arguments are cut before they are formatted in, so a huge one is never
    copied whole; the record then carries only the finished, bounded message
    (journald stores ``args`` and ``exc_info`` as fields of their own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(clipped(arg, MAX_LOG_CHARS) if isinstance(arg, str) else arg
                                for arg in record.args)
        record.msg, record.args = one_line(record.getMessage(), MAX_LOG_CHARS), None
        if record.exc_info:
            record.exc_text = clipped(logging.Formatter().formatException(record.exc_info), 4 * MAX_LOG_CHARS)
            record.exc_info = None
        for name, value in list(vars(record).items()):
            if name.isupper() and isinstance(value, str):  # the structured fields
                setattr(record, name, one_line(value, MAX_LOG_FIELD_CHARS))
        return True


class PerClientRate(logging.Filter):
    """At most ``rate`` lines a second (``burst`` at once) about one client uid,
    a line counting once per started LINE_BYTES: bytes, not only lines, are
    bounded (``rate`` short lines or about ``rate`` x LINE_BYTES bytes a second).

    Each bad request is logged, and a client can send thousands a second:
    without a bound one uid fills the journal and, past journald's own
    per-unit rate limit, gets the daemon's other lines suppressed too. Lines
    over the bound are dropped and counted; the uid's next line says how
    many. The daemon's own lines (no CLIENT_UID) are never limited."""

    def __init__(self, rate: float = 20.0, burst: float = 200.0, clock=time.monotonic):
        super().__init__()
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict = {}   # uid -> [tokens, last refill, lines dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        uid = getattr(record, "CLIENT_UID", None)
        if uid is None:
            return True
        now = self._clock()
        tokens, last, dropped = self._buckets.get(uid, (self.burst, now, 0))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        cost = 1 + _line_bytes(record) // LINE_BYTES
        if tokens < cost:
            self._buckets[uid] = [tokens, now, dropped + 1]
            return False
        if dropped and isinstance(record.msg, str):  # formatted (and bounded) later
            record.msg += f" ({dropped} earlier line(s) about uid {uid} not logged: over {self.rate:g} lines/s)"
        self._buckets[uid] = [tokens - cost, now, 0]
        if len(self._buckets) > 4096:  # uids that went quiet are full again: forget them
            self._buckets = {key: value for key, value in self._buckets.items() if value[2] or value[0] < self.burst}
        return True


def _line_bytes(record: logging.LogRecord) -> int:
    """What a record writes (after BoundedRecords: the final text): its message
    and structured fields, in UTF-8 (a character may take up to 4 bytes)."""
    fields = sum(len(str(value)) for name, value in vars(record).items() if name.isupper())
    return len(str(record.msg).encode("utf-8", "backslashreplace")) + fields


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
    handler.addFilter(BoundedRecords())   # first: the rate counts the bounded text
    handler.addFilter(PerClientRate())
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
