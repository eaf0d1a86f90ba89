"""Which model files the daemon may open, and opening them safely.

Any user of the socket can name a path; without these rules the daemon
(which may read files its clients cannot) would open whatever it is told.
A path is accepted only if its real location, after every symlink and
``..`` is resolved, lies inside one of the configured ``model_dirs``.
A path outside is ``forbidden`` before we say whether it exists, so the
socket cannot be used to probe the file system.

Two steps, in two places:

- ``resolve_model_path`` (worker thread, while a request is validated)
  checks the path by name and gives the v1 error texts. It returns an
  :class:`AllowedPath`: the real path, remembering the folders it was
  checked against.
- ``open_model`` (device thread, when the model is loaded) opens the file
  once and checks *the opened file*, not its name: a folder or link swapped
  between the check and the open (members of group ``hailo`` may write in
  ``/var/lib/hailo/models``) cannot make the daemon read a file outside
  ``model_dirs``. HailoRT then gets ``/proc/self/fd/N``, which names that
  very file whatever happens to the path afterwards. The descriptor lives
  as long as the loaded model (``ModelFiles.close`` on release).

How ``open_model`` opens: ``O_PATH`` first (no read, no side effect of
opening a device node, no blocking on a FIFO), then the descriptor's
location is read back from ``/proc/self/fd/N`` and checked against the
folders, and ``fstat`` must say regular file; only then is that same inode
reopened for reading through ``/proc/self/fd/N`` (no second path lookup).
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import shutil
import stat
import tempfile
import time

from ..wire.protocol import BAD_REQUEST, FORBIDDEN, LOAD_FAILED, MODEL_NOT_FOUND, RequestError

MAX_PATH_CHARS = 4096
FD_DIR = "/proc/self/fd"
_FD_PATH = re.compile(r"/proc/self/fd/(\d+)")
# HailoRT's name for a file it cannot read (status 13), which the README's
# troubleshooting table and clients look for.
OPEN_FILE_FAILURE = "HAILO_OPEN_FILE_FAILURE (13)"
UNREADABLE_HINT = ("the daemon's user (hailo-device-mgr) cannot read the file: make it readable by group "
                   "hailo, e.g. put it under /var/lib/hailo/models")


class AllowedPath(str):
    """A real path that passed the ``model_dirs`` check (a ``str``).

    ``model_dirs`` are the configured folders it was checked against, so
    the device thread checks the opened file against the same ones, even if
    the configuration was reloaded in between."""

    model_dirs: tuple[str, ...]

    def __new__(cls, path: str, model_dirs: tuple[str, ...]):
        self = super().__new__(cls, path)
        self.model_dirs = tuple(model_dirs)
        return self


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _allowed(real: str, model_dirs: tuple[str, ...]) -> bool:
    for folder in model_dirs:
        try:
            if _inside(real, os.path.realpath(folder)):
                return True
        except OSError:  # a folder being replaced right now allows nothing
            continue
    return False


def _forbidden(path: str, model_dirs: tuple[str, ...]) -> RequestError:
    return RequestError(
        FORBIDDEN, f"Model path {path} is outside the allowed model folders ({', '.join(model_dirs)}); "
                   "to allow another folder, add it to model_dirs in a drop-in such as "
                   "/etc/hailo/device-manager.d/<service>.yaml")


def _not_found(path: str) -> RequestError:
    return RequestError(MODEL_NOT_FOUND, f"Model file not found: {path}")  # v1 text, exactly


def _realpath(path: str, shown: str) -> str:
    """``os.path.realpath``, whose OSError (a link replaced while it resolves) is a client error."""
    try:
        return os.path.realpath(path)
    except OSError:  # e.g. EINVAL: lstat saw a link, readlink found none
        raise _not_found(shown) from None


def _check_form(path: str, field: str) -> None:
    if not isinstance(path, str) or not path:
        raise RequestError(BAD_REQUEST, f"{field} must be a non-empty string")
    if len(path) > MAX_PATH_CHARS or "\0" in path:
        raise RequestError(BAD_REQUEST, f"{field} is not a valid path")
    try:
        os.fsencode(path)  # a lone surrogate from a JSON escape has no file name
    except UnicodeEncodeError:
        raise RequestError(BAD_REQUEST, f"{field} is not a valid path") from None
    if not os.path.isabs(path):
        raise RequestError(BAD_REQUEST, f"{field} must be absolute, got {path}")


# Names resolved lately: (name, model_dirs) -> (AllowedPath, (st_dev, st_ino), checked_at).
# realpath costs a system call per path component on every request. A name
# checked less than RESOLUTION_TRUST_S ago is taken as it was; after that,
# one stat of the name tells whether it still leads to the same file (another
# name for it, a hard link, is the same bytes), and anything else resolves
# again. Why trust at all: on the event loop every system call lets the
# device thread take the GIL, so a stat per small request cost two context
# switches (measured: 12 % of the daemon's CPU per request). What the trust
# allows is only staleness: for at most that long a re-pointed name still
# means the real path it was checked as, which was inside model_dirs, and
# open_model checks the opened file again in any case. Any thread may use
# the table (dict operations are atomic); cleared when full.
RESOLUTION_TRUST_S = 1.0
_RESOLVED: dict = {}
_RESOLVED_MAX = 1024


class NotResolvedLately(Exception):
    """``resolve_model_path(lately_only=True)`` met a name it must resolve again."""


def resolve_model_path(path: str, model_dirs: tuple[str, ...], field: str = "model_path",
                       lately_only: bool = False) -> AllowedPath:
    """The real path of an allowed, existing model file; raises RequestError.

    ``field`` names the request field in error messages. ``lately_only``:
    raise NotResolvedLately rather than resolve a name that is not known
    from lately (a path's resolution costs a system call per component, and
    a client chooses how many: the event loop leaves that to a worker)."""
    key = (path, model_dirs)
    known = _RESOLVED.get(key)
    if known is not None:
        allowed, identity, checked_at = known
        now = time.monotonic()
        if now - checked_at < RESOLUTION_TRUST_S:
            return allowed
        try:
            found = os.stat(path)
        except (OSError, ValueError):
            found = None
        if found is not None and (found.st_dev, found.st_ino) == identity and stat.S_ISREG(found.st_mode):
            _RESOLVED[key] = (allowed, identity, now)
            return allowed
    if lately_only:
        raise NotResolvedLately(path)
    _check_form(path, field)
    real = _realpath(path, path)
    if not _allowed(real, model_dirs):
        raise _forbidden(path, model_dirs)
    try:
        found = os.stat(real)
    except OSError:
        raise _not_found(path) from None
    if not stat.S_ISREG(found.st_mode):  # a folder or a device is no model file (v1 text, exactly)
        raise _not_found(path)
    allowed = AllowedPath(real, model_dirs)
    if len(_RESOLVED) >= _RESOLVED_MAX:
        _RESOLVED.clear()
    _RESOLVED[key] = (allowed, (found.st_dev, found.st_ino), time.monotonic())
    return allowed


class ModelFile:
    """One opened model file: the descriptor HailoRT reads through ``path``."""

    def __init__(self, fd: int, real_path: str):
        self.fd: int | None = fd
        self.real_path = real_path    # where the opened file is (read back from the descriptor)
        self.path = f"{FD_DIR}/{fd}"  # what HailoRT opens: exactly this file

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd is None

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelFile({self.path} -> {self.real_path})"


def _located(fd: int) -> str:
    """Where an open descriptor's file is, as the kernel knows it."""
    return os.readlink(f"{FD_DIR}/{fd}")


def open_model(path: str, model_dirs: tuple[str, ...] | None = None, *, field: str = "model_path",
               shown: str | None = None) -> ModelFile:
    """Open an allowed model file for HailoRT; the caller closes the result.

    ``model_dirs`` defaults to the folders an :class:`AllowedPath` was
    checked against; a plain path without folders is refused (fail closed).
    ``shown`` is the path as the client wrote it, for messages (default
    ``path``). Errors are RequestErrors with the texts of
    ``resolve_model_path`` (``forbidden``, ``model_not_found``), or
    ``load_failed`` naming HAILO_OPEN_FILE_FAILURE when the daemon may not
    read the file. No descriptor is left open when it raises.
    """
    shown = str(path) if shown is None else shown
    if model_dirs is None:
        model_dirs = getattr(path, "model_dirs", None)
    if not model_dirs:
        raise RequestError(FORBIDDEN, f"Model path {shown} was not checked against the allowed model folders")
    _check_form(path, field)
    real = _realpath(path, shown)
    if not _allowed(real, model_dirs):
        raise _forbidden(shown, model_dirs)
    try:
        # O_NOFOLLOW: the real path has no link in it; one appearing now is a swap.
        probe = os.open(real, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise _not_found(shown) from None
    try:
        located = _located(probe)
        if not _allowed(located, model_dirs):
            raise _forbidden(shown, model_dirs)
        if not stat.S_ISREG(os.fstat(probe).st_mode):  # a link, FIFO, device or folder
            raise _not_found(shown)
        try:
            # Reopens the inode behind `probe`: no path lookup, so nothing left to swap.
            fd = os.open(f"{FD_DIR}/{probe}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise RequestError(LOAD_FAILED, f"Failed to load model: cannot open {shown}: {exc.strerror} "
                                            f"[{OPEN_FILE_FAILURE}]; {UNREADABLE_HINT}") from None
    finally:
        os.close(probe)
    return ModelFile(fd, located)


_link_dir: str | None = None
_link_count = itertools.count(1)


def _private_link_dir() -> str:
    """A folder only the daemon's user can enter (mode 0700), made once per process."""
    global _link_dir
    if _link_dir is None:
        _link_dir = tempfile.mkdtemp(prefix="hailo-devmgr-hefs-")
        atexit.register(shutil.rmtree, _link_dir, True)
    return _link_dir


class ModelFiles:
    """The files of one loaded model (its HEF and any named in model_params).

    ``open(path, key)`` has the signature of check_params' ``resolve_path``,
    so a handler's own ``check_params`` says which parameters are files.
    """

    def __init__(self):
        self.files: list[ModelFile] = []
        self.links: dict[str, str] = {}  # host-only link -> the /proc/self/fd/N path it names

    def host_link(self, fd_path: str) -> str:
        """A path for HailoRT calls that send the path *string* to the chip.

        genai VLM and LLM pass the HEF path to the chip's own server, which
        looks it up in the chip's file system before asking for an upload;
        there ``/proc/self/fd/N`` may name an unrelated file. A symlink to our
        descriptor in a folder private to the daemon exists only on the host
        (so the chip cannot find it and the file is uploaded), and no one else
        can swap it after the check. Removed with the model's files."""
        real = next((f.real_path for f in self.files if f.path == fd_path), fd_path)
        # The name only helps reading logs: cut it well below NAME_MAX.
        link = os.path.join(_private_link_dir(), f"{next(_link_count)}-{os.path.basename(real)[-100:]}")
        os.symlink(fd_path, link)
        self.links[link] = fd_path
        return link

    def open(self, path: str, key: str | None = None, shown: str | None = None) -> str:
        """Open ``path``; returns the ``/proc/self/fd/N`` path to hand HailoRT."""
        model_file = open_model(path, field="model_path" if key is None else f"model_params.{key}",
                                shown=shown)
        self.files.append(model_file)
        return model_file.path

    def close(self) -> None:
        links, self.links = self.links, {}
        for link in links:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
        files, self.files = self.files, []
        for model_file in files:
            model_file.close()

    def shown(self, text: str) -> str:
        """``text`` with our ``/proc/self/fd/N`` paths and links replaced by the real files' paths."""
        names = {model_file.path: model_file.real_path for model_file in self.files}
        for link, fd_path in self.links.items():
            text = text.replace(link, names.get(fd_path, fd_path))
        return _FD_PATH.sub(lambda match: names.get(match.group(0), match.group(0)), text)

    def __enter__(self) -> "ModelFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

