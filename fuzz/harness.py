"""What the fuzzers drive: the daemon's request path without sockets or a device.

``answer(body, config)`` does what the server does with one frame body
before the device thread sees it: ``decode_body``, ``parse_request``, and
for device actions ``actions.prepare`` (model-file rules, every handler's
``check_params`` and ``parse_input``, tensor decoding), then builds the
response it would send and encodes it. ``feed(data, config)`` runs a byte
stream through the frame codec first (wire/codec.py ``FrameReader``, as
the daemon uses it: JSON decoded by the caller, attachments read into
buffers), half of it fed as read ahead and half read into the buffers
the reader asks for.

The rule under test: a client can only ever cause a ``RequestError``.
Anything else escaping is a bug (the server would answer ``internal_error``
or drop the connection without an answer).

``KNOWN_ISSUES`` lists the bugs found this way in modules this work could
not change; the fuzzers count them instead of stopping on them (atheris
with ``--strict`` stops), and tests/test_fuzz_regressions.py keeps one
strict-xfail case for each, so a fix shows up as a failing xfail to remove.

Imported by fuzz/fuzz_frames.py (atheris) and by tests/fuzz_support.py
(hypothesis); it imports neither.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

from hailo_devmgr.daemon import actions  # noqa: E402
from hailo_devmgr.wire import codec  # noqa: E402
from hailo_devmgr.wire import protocol as p  # noqa: E402
from hailo_devmgr.wire.protocol import RequestError  # noqa: E402


@dataclass(frozen=True)
class KnownIssue:
    name: str
    where: str          # the module at fault
    exception: type
    message: str        # regex on str(exception)
    what: str

    def matches(self, exc: BaseException) -> bool:
        return isinstance(exc, self.exception) and re.search(self.message, str(exc)) is not None


# None open: every finding so far is fixed and replayed as a plain regression.
KNOWN_ISSUES: tuple[KnownIssue, ...] = ()


def known_issue(exc: BaseException) -> KnownIssue | None:
    for issue in KNOWN_ISSUES:
        if issue.matches(exc):
            return issue
    return None


def answer(body: bytes, config) -> dict:
    """The response the daemon would send for one frame body (device work left out).

    Device actions that pass validation answer ``{"status": "ok",
    "prepared": action}`` here (the daemon would queue them)."""
    request = None
    message = None
    try:
        message = p.decode_body(body)
        request = p.parse_request(message)
        if request.action in p.DEVICE_ACTIONS:
            actions.prepare(request, config)
            response = p.ok_response(request, {"prepared": request.action})
        else:
            response = p.ok_response(request, {})
    except RequestError as error:
        if request is None:
            request_id, has_id = p.request_id_of(message)
            request = p.Request("", {}, request_id, has_id)
        response = p.error_response(request, error)
    p.encode_frame(response)  # what the server sends must be encodable
    return response


def feed(data: bytes, config, split: int | None = None) -> list[dict]:
    """A byte stream as one connection would send it: frames out, each answered.

    ``split`` cuts the stream in two at that offset: the first piece is fed
    whole (read ahead), the second read into the views the reader asks for,
    a few bytes at a time (as a socket read would), so both ways in are
    driven. A fatal framing error (``too_large``, a bad ``attachments``
    list) ends the stream, as the server closes the connection after
    answering it."""
    reader = codec.FrameReader(config.max_message_bytes, decode=False)
    split = len(data) // 2 if split is None else max(0, min(split, len(data)))
    responses = []
    try:
        reader.feed(data[:split])
        responses.extend(answer(frame.body, config) for frame in reader.frames())
        rest = memoryview(data)[split:]
        step = 1 + split % 7
        while True:
            responses.extend(answer(frame.body, config) for frame in reader.frames())
            if not rest:
                break
            view = reader.want()
            count = min(len(view), len(rest), step)
            view[:count] = rest[:count]
            rest = rest[count:]
            reader.got(count)
    except RequestError as error:
        assert error.fatal and error.code in (p.TOO_LARGE, p.BAD_REQUEST), error
        responses.append(p.error_response(None, error))
        return responses
    finally:
        reader.close()
    assert reader.pending < p.HEADER_SIZE + config.max_message_bytes
    return responses


def fuzz_one(data: bytes, config) -> list[dict]:
    """One fuzz input (atheris's, and the files in tests/fuzz_regressions/).

    The first byte picks the form: odd, the rest is one frame's body (so a
    mutated JSON text always reaches decode_body and past it); even, the
    rest is a raw stream of frames, fed in two pieces split where the
    first byte says."""
    if not data:
        return []
    if data[0] & 1:
        body = data[1:]
        return feed(p.HEADER.pack(len(body)) + body, config)
    return feed(data[1:], config, split=data[0] * len(data) // 256)


def fuzz_config(model_dir: str, max_message_bytes: int = 1 << 20):
    """A configuration like the daemon's, with ``model_dir`` the only model folder."""
    from dataclasses import replace

    from hailo_devmgr.daemon import config as config_mod
    return replace(config_mod.Config(), backend="simulated", model_dirs=(model_dir,),
                   max_message_bytes=max_message_bytes, max_pending_bytes=max(max_message_bytes, 1024))


def make_model_dir(folder: str) -> dict[str, str]:
    """Model files to aim at: name → path (some inside, one link escaping, one missing)."""
    import json
    models = os.path.join(folder, "models")
    outside = os.path.join(folder, "outside")
    os.makedirs(os.path.join(models, "subdir"), exist_ok=True)
    os.makedirs(outside, exist_ok=True)
    small = {"inputs": [{"name": "x", "shape": [4], "format": "UINT8"}],
             "outputs": [{"name": "y", "shape": [4], "format": "FLOAT32"}]}
    files = {"net.hef": "binary HEF stand-in\n", "small.hef": json.dumps(small), "empty.hef": "",
             "vlm.hef": json.dumps({"frame_shape": [4, 4, 3]}), "speech.hef": "speech stand-in\n"}
    for name, text in files.items():
        with open(os.path.join(models, name), "w") as handle:
            handle.write(text)
    with open(os.path.join(outside, "secret.hef"), "w") as handle:
        handle.write("not for socket users\n")
    escape = os.path.join(models, "escape.hef")
    if not os.path.lexists(escape):
        os.symlink(os.path.join(outside, "secret.hef"), escape)
    return {
        "net": os.path.join(models, "net.hef"), "small": os.path.join(models, "small.hef"),
        "vlm": os.path.join(models, "vlm.hef"), "speech": os.path.join(models, "speech.hef"),
        "empty": os.path.join(models, "empty.hef"), "escape": escape,
        "missing": os.path.join(models, "missing.hef"), "subdir": os.path.join(models, "subdir"),
        "outside": os.path.join(outside, "secret.hef"), "dotdot": os.path.join(models, "..", "outside", "secret.hef"),
        "relative": "models/net.hef", "models": models,
    }
