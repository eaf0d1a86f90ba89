"""Which model files the daemon may open.

Any user of the socket can name a path; without this check the daemon
(which may read files its clients cannot) would open whatever it is told.
A path is accepted only if its real location, after every symlink and
``..`` is resolved, lies inside one of the configured ``model_dirs``.
A path outside is ``forbidden`` before we say whether it exists, so the
socket cannot be used to probe the file system.
"""
from __future__ import annotations

import os
import stat

from .protocol import BAD_REQUEST, FORBIDDEN, MODEL_NOT_FOUND, RequestError

MAX_PATH_CHARS = 4096


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def resolve_model_path(path: str, model_dirs: tuple[str, ...], field: str = "model_path") -> str:
    """The real path of an allowed, existing model file; raises RequestError.

    ``field`` names the request field in error messages."""
    if not isinstance(path, str) or not path:
        raise RequestError(BAD_REQUEST, f"{field} must be a non-empty string")
    if len(path) > MAX_PATH_CHARS or "\0" in path:
        raise RequestError(BAD_REQUEST, f"{field} is not a valid path")
    if not os.path.isabs(path):
        raise RequestError(BAD_REQUEST, f"{field} must be absolute, got {path}")
    real = os.path.realpath(path)
    allowed = [os.path.realpath(folder) for folder in model_dirs]
    if not any(_inside(real, folder) for folder in allowed):
        raise RequestError(
            FORBIDDEN,
            f"Model path {path} is outside the allowed model folders ({', '.join(model_dirs)})")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise RequestError(MODEL_NOT_FOUND, f"Model file not found: {path}") from None
    except OSError:
        raise RequestError(MODEL_NOT_FOUND, f"Model file not found: {path}") from None
    if not stat.S_ISREG(mode):  # a folder or a device is no model file (v1 text, exactly)
        raise RequestError(MODEL_NOT_FOUND, f"Model file not found: {path}")
    return real
