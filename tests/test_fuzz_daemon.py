"""Random frames and bodies against a running daemon (one per module, simulated backend).

Each example opens a connection and sends a few frames: requests for every
action and model type with fields right, wrong or missing, random bytes,
and sometimes an oversized length or a torn frame at the end. Properties:

- every frame that arrived whole gets a well-formed answer (``status: ok``
  or ``error`` + a known ``code``; ``request_id`` echoed as the request had
  it) unless the connection ends cleanly after a fatal framing error or a
  listed known issue (fuzz/harness.py);
- where validation alone decides (computed offline with the same code,
  fuzz/harness.py ``answer``), the daemon answers exactly that error;
- ``internal_error`` only ever answers a listed known issue;
- afterwards the daemon still answers ``ping`` on a new connection.
"""
from __future__ import annotations

import json
import math
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from conftest import DaemonProcess, write_config
from fuzz_support import FUZZ, dumps, harness, json_values, request_bodies, valid_requests
from hailo_devmgr.wire import protocol as p
from wire import read_answer

REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"
CODES = {value for name, value in vars(p).items() if name.isupper() and isinstance(value, str)}
MAX_MESSAGE_BYTES = 64 * 1024
READ_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-daemon")
    paths = harness.make_model_dir(str(root))
    config_path = write_config(root, root / "models", max_message_bytes=MAX_MESSAGE_BYTES,
                               max_loaded_models=3, log_level="info",
                               simulated={"load_ms": 1, "infer_ms": 0})
    import yaml
    socket_path = yaml.safe_load(config_path.read_text())["socket_path"]
    daemon = DaemonProcess(root, config_path, socket_path).wait_ready()
    from hailo_devmgr.daemon import config as config_mod
    daemon.paths = paths
    daemon.config = config_mod.load(config_path, {})
    yield daemon
    assert daemon.process.poll() is None, f"the daemon died:\n{daemon.log()[-3000:]}"
    assert daemon.stop() == 0


def read_answers(sock: socket.socket, wanted: int | None) -> list[dict]:
    """``wanted`` answers (or until a clean close when None or earlier)."""
    answers = []
    while wanted is None or len(answers) < wanted:
        answer = read_answer(sock)   # the codec; asserts no answer is cut short
        if answer is None:
            break
        assert isinstance(answer, dict)
        answers.append(answer)
    return answers


def well_formed(answer: dict) -> None:
    if "error" in answer:
        assert "status" not in answer, answer
        assert isinstance(answer["error"], str) and answer["error"], answer
        assert answer.get("code") in CODES, answer
    else:
        assert answer.get("status") == "ok", answer


def offline(body: bytes, config) -> dict | None:
    """What validation alone answers for ``body``; None for a known issue."""
    try:
        return harness.answer(body, config)
    except Exception as exc:
        if harness.known_issue(exc) is None:
            raise
        return None


def ping(socket_path: str) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(READ_TIMEOUT_S)
        sock.connect(socket_path)
        sock.sendall(p.encode_frame({"action": "ping", "request_id": "alive?"}))
        [answer] = read_answers(sock, 1)
    return answer


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@st.composite
def connections(draw, paths):
    bodies = draw(st.lists(st.one_of(
        valid_requests(paths).map(dumps),
        valid_requests(paths).map(dumps),
        request_bodies(paths).map(dumps),
        request_bodies(paths).map(dumps),
        st.binary(max_size=40),
        json_values.map(dumps),
        st.sampled_from([b"", b"{}", b"[]", b"null", b'{"action": "ping"', b'{"action":"ping","request_id":NaN}',
                         b"\xff\xfe", b'{"action":"status"}' + b" " * 100])), min_size=1, max_size=4))
    ending = draw(st.sampled_from(["none", "none", "too_large", "torn_header", "torn_body"]))
    return bodies, ending


@FUZZ(300)
@given(data=st.data())
def test_every_frame_gets_a_well_formed_answer_or_a_clean_close(fuzz_daemon, data):
    config, paths = fuzz_daemon.config, fuzz_daemon.paths
    bodies, ending = data.draw(connections(paths))
    expected = [offline(body, config) for body in bodies]
    # Answers in order only on a v1 connection; any hello may switch it to v2.
    v1 = not any(b"hello" in body for body in bodies)
    # A known issue may end the connection without an answer: expect answers before it.
    answerable = next((i for i, item in enumerate(expected) if item is None), len(bodies))
    stream = b"".join(frame(body) for body in bodies)
    if ending == "too_large":
        stream += struct.pack(">I", MAX_MESSAGE_BYTES + 1) + b"{"
    elif ending == "torn_header":
        stream += b"\x00\x00"
    elif ending == "torn_body":
        stream += struct.pack(">I", 100) + b'{"action":'

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(READ_TIMEOUT_S)
        sock.connect(fuzz_daemon.socket_path)
        sock.sendall(stream)
        if ending == "none":
            answers = read_answers(sock, answerable)
        else:
            if ending != "too_large":
                sock.shutdown(socket.SHUT_WR)  # the client goes away mid-frame
            answers = read_answers(sock, None)  # until the daemon closes

    for answer in answers:
        well_formed(answer)
    if ending == "too_large":
        # The oversized length is answered, then the connection ends; answers to
        # the frames before it may be cut short (a v1 client never sends ahead).
        assert answers and answers[-1]["code"] == p.TOO_LARGE and "request_id" not in answers[-1], answers
        answers = answers[:-1]
    if v1:
        if ending == "none":
            assert len(answers) == answerable, (bodies, answers)
        elif len(answers) < answerable:
            # The client left mid-frame: work it queued may be dropped unanswered.
            event("answers cut short by the client leaving")
        for body, want, got in zip(bodies, expected, answers):
            if want is None:
                break
            assert got.get("request_id", "absent") == want.get("request_id", "absent"), (body, got)
            if "error" in want:
                # Decided by validation alone: the daemon gives exactly that answer.
                assert (got.get("code"), got.get("error")) == (want["code"], want["error"]), (body, got)
            if got.get("code") == p.INTERNAL_ERROR:
                pytest.fail(f"internal_error for {body!r}: {got}")
            event(f"answer {got.get('code', 'ok')}")
    else:
        for answer in answers:
            assert answer.get("code") != p.INTERNAL_ERROR, answer
        event("v2 connection")
    assert ping(fuzz_daemon.socket_path)["request_id"] == "alive?"


def test_keep_alive_that_json_cannot_write_back_does_not_break_status(fuzz_daemon):
    """Found by fuzzing: keep_alive NaN or 1e999 (json.loads accepts both)
    made every later status answer unencodable. Now NaN is not JSON at all
    and an infinite keep_alive is a bad_request; status stays encodable."""
    path = fuzz_daemon.paths["net"]
    for keep_alive in (b"NaN", b"1e999", b"-Infinity"):
        body = (b'{"action":"load_model","model_type":"generic","model_path":' + json.dumps(path).encode()
                + b',"keep_alive":' + keep_alive + b"}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(READ_TIMEOUT_S)
            sock.connect(fuzz_daemon.socket_path)
            sock.sendall(frame(body) + p.encode_frame({"action": "status"}))
            load, status = read_answers(sock, 2)
        assert load["code"] == p.BAD_REQUEST, load
        assert all(value is None or math.isfinite(value) for model in status["loaded_models"]
                   for value in model.values() if isinstance(value, float))


@pytest.mark.parametrize("case", sorted(REGRESSIONS.glob("*.bin")), ids=lambda path: path.stem)
def test_every_fuzz_finding_costs_at_most_its_own_connection(fuzz_daemon, case):
    """The replayed findings (known issues included) against the daemon itself:
    a well-formed answer or a clean close, and the daemon answers ping afterwards."""
    data = case.read_bytes().replace(b"@MODELS@", fuzz_daemon.paths["models"].encode())
    assert data[0] & 1, "a single-body case"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(READ_TIMEOUT_S)
            sock.connect(fuzz_daemon.socket_path)
            sock.sendall(frame(data[1:]))
            answers = read_answers(sock, 1)
    finally:
        assert ping(fuzz_daemon.socket_path)["request_id"] == "alive?"
    for answer in answers:
        well_formed(answer)
    if not case.name.startswith("known-"):
        assert answers and answers[0]["code"] == p.BAD_REQUEST, answers
