#!/usr/bin/python3
"""Soak test: many clients, every action, bad input and abrupt disconnects, for minutes.

Starts the daemon on the simulated backend (small latencies, few model
slots so models are loaded, evicted and unloaded all the time), runs N
client threads (default 32), each on its own connection, mixing ping,
status, device_status, load_model, infer for every model type,
unload_model, requests that must fail with a given code, and connections
cut mid-frame or right after sending. Every answer is checked against
what was asked: its request_id, the shape of its result (and, for the
same input, the same result as before), or the expected error code.

It samples the daemon's RSS (/proc/PID/status VmRSS) and open descriptors
(/proc/PID/fd) and prints a table. Exit status 1 only for correctness:
an answer lost, crossed (another request's answer) or unexpected, or a
descriptor leak (more open at the end, every model unloaded and every
client gone, than at the start). RSS growth is reported ("flat" when it
grew less than 10% after warm-up) but does not fail the run.

    make soak                                   # 120 s, 32 clients
    SOAK_SECONDS=600 make soak
    PYTHONPATH=src python3 bench/soak.py --seconds 10 --clients 8 --json /tmp/soak.json
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from hailo_devmgr.wire import protocol as p  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import running_daemon  # noqa: E402  (one way to start and stop the daemon)

ANSWER_TIMEOUT_S = 60          # an answer later than this counts as lost
SAMPLE_EVERY_S = 0.5
RSS_FLAT_LIMIT = 0.10          # growth after warm-up under this is "flat"
MODEL_TYPES = ("generic", "clip", "vlm", "vlm_chat", "whisper", "ocr", "depth", "pose")
# Control-plane actions mixed in (metrics where this daemon has it).
CONTROL = ("ping", "ping", "status", "device_status") + (("metrics",) if "metrics" in p.ACTIONS else ())
SMALL_NET = {"inputs": [{"name": "x", "shape": [4], "format": "UINT8"}],
             "outputs": [{"name": "y", "shape": [4], "format": "FLOAT32"}], "memory_mb": 1}


# ------------------------------------------------------------------ the daemon

def write_setup(root: Path, clients: int) -> tuple[dict, Path, str]:
    models = root / "models"
    models.mkdir()
    (models / "small.hef").write_text(yaml.safe_dump(SMALL_NET))
    (models / "vlm.hef").write_text(yaml.safe_dump({"frame_shape": [4, 4, 3], "memory_mb": 1}))
    (models / "speech.hef").write_text(yaml.safe_dump({"memory_mb": 1}))
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.hef").write_text(yaml.safe_dump(SMALL_NET))
    (models / "escape.hef").symlink_to(outside / "secret.hef")
    sock = str(root / "device.sock")
    config = {
        "backend": "simulated", "socket_path": sock, "model_dirs": [str(models)],
        "log_level": "warning", "max_loaded_models": 4, "max_message_bytes": 1024 * 1024,
        # Every client here is one uid: room for each one's connection and its abrupt extra one.
        "max_connections": 4 * clients + 16, "max_connections_per_uid": 4 * clients + 16,
        "simulated": {"load_ms": 2, "infer_ms": 1, "lock_path": str(root / "device.lock")},
    }
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    paths = {name: str(models / f"{name}.hef") for name in ("small", "vlm", "speech", "escape")}
    paths["missing"] = str(models / "missing.hef")
    return paths, config_path, sock


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# ------------------------------------------------------------------ the wire

def frame(message) -> bytes:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


class Lost(Exception):
    """No answer: timeout, or the daemon closed the connection."""


class Conn:
    """One v1 connection: send a request, read its answer. Raw, to see exactly what comes back."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(ANSWER_TIMEOUT_S)
        self.sock.connect(path)

    def ask(self, message) -> dict:
        self.sock.sendall(frame(message))
        return self.read()

    def read(self) -> dict:
        (length,) = struct.unpack(">I", self._exactly(4))
        return json.loads(self._exactly(length))

    def _exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            try:
                chunk = self.sock.recv(size - len(data))
            except socket.timeout:
                raise Lost(f"no answer within {ANSWER_TIMEOUT_S} s") from None
            if not chunk:
                raise Lost("the daemon closed the connection")
            data += chunk
        return bytes(data)

    def close(self) -> None:
        self.sock.close()


def tensor(dtype: str, shape: list, raw: bytes) -> dict:
    return {"dtype": dtype, "shape": shape, "data_b64": base64.b64encode(raw).decode()}


def is_tensor(value, shape: list, dtype: str = "float32") -> bool:
    if not (isinstance(value, dict) and value.get("dtype") == dtype and value.get("shape") == shape):
        return False
    try:
        raw = base64.b64decode(value["data_b64"], validate=True)
    except (ValueError, TypeError):
        return False
    size = 4 if dtype == "float32" else 1
    count = 1
    for side in shape:
        count *= side
    return len(raw) == count * size


# ------------------------------------------------------------------ what the clients do

@dataclass
class Tally:
    """Outcomes, shared by the client threads (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Counter = field(default_factory=Counter)    # by scenario
    outcomes: Counter = field(default_factory=Counter)    # ok / expected <code> / lost / crossed / unexpected
    problems: list = field(default_factory=list)          # the first few, for the report
    disconnects: int = 0

    def add(self, scenario: str, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.requests[scenario] += 1
            self.outcomes[outcome] += 1
            if outcome in ("lost", "crossed", "unexpected") and len(self.problems) < 20:
                self.problems.append(f"{outcome}: {scenario}: {detail}"[:400])


class Client(threading.Thread):
    """One client: its own connection, inputs of its own (so answers can be told apart)."""

    def __init__(self, index: int, sock: str, paths: dict, deadline: float, tally: Tally,
                 references: dict, seed: int):
        super().__init__(name=f"soak-client-{index}", daemon=True)
        self.index, self.sock_path, self.paths, self.deadline = index, sock, paths, deadline
        self.tally, self.references = tally, references
        self.random = random.Random(seed * 1000 + index)
        self.count = 0
        self.conn: Conn | None = None

    # -- plumbing

    def next_id(self) -> str:
        self.count += 1
        return f"c{self.index}-{self.count}"

    def connection(self) -> Conn:
        if self.conn is None:
            self.conn = Conn(self.sock_path)
        return self.conn

    def ask(self, scenario: str, message: dict, check) -> None:
        """Send, read, check: one outcome per request."""
        request_id = self.next_id()
        message = {**message, "request_id": request_id}
        try:
            answer = self.connection().ask(message)
        except (Lost, OSError) as exc:
            self.tally.add(scenario, "lost", f"{request_id}: {exc}")
            self._reconnect()
            return
        if answer.get("request_id") != request_id:
            self.tally.add(scenario, "crossed", f"asked {request_id}, answer {str(answer)[:200]}")
            self._reconnect()  # the stream can no longer be trusted
            return
        outcome, detail = check(answer)
        self.tally.add(scenario, outcome, f"{request_id}: {detail}")

    def _reconnect(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # -- checks

    @staticmethod
    def ok(shape_ok):
        def check(answer):
            if "error" in answer:
                return "unexpected", f"error {answer.get('code')}: {answer['error']}"
            if answer.get("status") != "ok" or not shape_ok(answer):
                return "unexpected", f"wrong shape: {str(answer)[:300]}"
            return "ok", ""
        return check

    @staticmethod
    def error(code: str, text: str | None = None):
        def check(answer):
            if answer.get("code") != code or "status" in answer:
                return "unexpected", f"wanted {code}, got {str(answer)[:300]}"
            if text is not None and text not in answer.get("error", ""):
                return "unexpected", f"wanted {text!r} in {answer.get('error')!r}"
            return f"expected {code}", ""
        return check

    def same_as_before(self, key, result) -> bool:
        """A result for an input this client sent before must not change (else it is someone else's)."""
        text = json.dumps(result, sort_keys=True)
        previous = self.references.setdefault(key, text)
        return previous == text

    def crossed_or(self, key, shape_ok):
        def check(answer):
            outcome, detail = self.ok(lambda a: shape_ok(a["result"]))(answer)
            if outcome == "ok" and not self.same_as_before(key, answer["result"]):
                return "crossed", f"result for {key} changed: {str(answer['result'])[:200]}"
            return outcome, detail
        return check

    # -- scenarios

    def model(self, model_type: str) -> dict:
        path = {"vlm": self.paths["vlm"], "vlm_chat": self.paths["vlm"],
                "whisper": self.paths["speech"]}.get(model_type, self.paths["small"])
        message = {"model_type": model_type, "model_path": path}
        if model_type == "clip":
            message["model_params"] = {"text_hef_path": self.paths["small"]}
        if model_type == "ocr":
            message["model_params"] = {"recognition_hefs": {"en": self.paths["small"]}}
        return message

    def infer(self) -> None:
        model_type = self.random.choice(MODEL_TYPES)
        k = self.random.randrange(4)
        x = tensor("uint8", [4], bytes([self.index % 256, k, 7, 9]))
        image = tensor("uint8", [4, 4, 3], bytes((self.index * 4 + k + i) % 256 for i in range(48)))
        key = (model_type, self.index, k)
        message = {"action": "infer", **self.model(model_type)}
        if model_type in ("generic",):
            message["input_data"] = {"inputs": {"x": x}}
            check = self.crossed_or(key, lambda r: is_tensor(r.get("outputs", {}).get("y"), [4]))
        elif model_type == "clip":
            message["input_data"] = {"mode": "image", "tensor": x}
            check = self.crossed_or(key, lambda r: is_tensor(r, [4]))
        elif model_type == "depth":
            message["input_data"] = {"input": x}
            check = self.crossed_or(key, lambda r: is_tensor(r, [4]))
        elif model_type == "pose":
            message["input_data"] = {"input": x}
            # One output: the bare tensor, as the earlier daemon answered.
            check = self.crossed_or(key, lambda r: is_tensor(r, [4]))
        elif model_type == "ocr":
            if k % 2:
                message["input_data"] = {"mode": "detection", "image": x}
                check = self.crossed_or(key, lambda r: is_tensor(r, [4]))
            else:
                message["input_data"] = {"mode": "recognition", "crops": [x, x], "language": "en"}
                check = self.crossed_or(key, lambda r: isinstance(r, list) and len(r) == 2
                                        and all(is_tensor(item, [4]) for item in r))
        elif model_type in ("vlm", "vlm_chat"):
            token = f"t{self.index}x{self.count + 1}"  # this request's own word: an answer must echo it
            if model_type == "vlm":
                message["input_data"] = {"prompt": f"describe {token}", "image": image}
            else:
                message["input_data"] = {"prompt": f"describe {token}", "frames": [image], "seed": k}

            def check(answer, token=token):
                outcome, detail = self.ok(lambda a: isinstance(a.get("result"), str))(answer)
                if outcome == "ok" and token not in answer["result"]:
                    return "crossed", f"answer without {token}: {answer['result'][:200]}"
                return outcome, detail
        else:  # whisper
            samples = [((self.index * 7 + k + i) % 50) / 100.0 for i in range(32)]
            message["input_data"] = {"audio": samples, "language": "en"}
            check = self.crossed_or(key, lambda r: isinstance(r, dict) and isinstance(r.get("segments"), list)
                                    and all({"id", "start", "end", "text"} <= set(s) for s in r["segments"]))
        self.ask(f"infer {model_type}", message, check)

    def load(self) -> None:
        model_type = self.random.choice(MODEL_TYPES)
        message = {"action": "load_model", **self.model(model_type)}
        self.ask(f"load_model {model_type}", message, self.ok(
            lambda a: a.get("message") in ("Model loaded", "Model already loaded")
            and a.get("model_path") == message["model_path"] and a.get("model_type") == model_type
            and (model_type != "ocr" or a.get("model_info", {}).get("detection_input_shape") == [4])))

    def unload(self) -> None:
        model_type = self.random.choice(MODEL_TYPES)
        message = {"action": "unload_model", **self.model(model_type)}
        message.pop("model_params", None)
        self.ask(f"unload_model {model_type}", message, self.ok(
            lambda a: a.get("message") in ("Model unloaded", "Model was not loaded")))

    def control(self) -> None:
        action = self.random.choice(CONTROL)
        if action == "metrics":
            shape = lambda a: True  # noqa: E731 - any ok answer (its fields belong to metrics.py)
        elif action == "device_status":
            shape = lambda a: isinstance(a.get("device"), dict) and isinstance(a.get("networks"), dict)  # noqa: E731
        else:
            shape = lambda a: isinstance(a.get("loaded_models"), list) and "uptime_seconds" in a  # noqa: E731
        self.ask(action, {"action": action}, self.ok(shape))

    def bad(self) -> None:
        small = self.paths["small"]
        x = tensor("uint8", [4], bytes(4))
        kind = self.random.randrange(8)
        if kind == 0:
            self.ask("bad: path outside (link)", {"action": "load_model", "model_type": "generic",
                                                  "model_path": self.paths["escape"]},
                     self.error("forbidden", "outside the allowed model folders"))
        elif kind == 1:
            self.ask("bad: missing file", {"action": "infer", "model_type": "generic",
                                           "model_path": self.paths["missing"], "input_data": {"inputs": {"x": x}}},
                     self.error("model_not_found", "Model file not found"))
        elif kind == 2:
            wrong = tensor("uint8", [5], bytes(5))
            self.ask("bad: tensor shape", {"action": "infer", "model_type": "generic", "model_path": small,
                                           "input_data": {"inputs": {"x": wrong}}},
                     self.error("bad_request", "the model expects [4]"))
        elif kind == 3:
            self.ask("bad: tensor bytes", {"action": "infer", "model_type": "depth", "model_path": small,
                                           "input_data": {"input": {"dtype": "uint8", "shape": [4],
                                                                    "data_b64": "AAA"}}},
                     self.error("bad_request"))
        elif kind == 4:
            self.ask("bad: unknown action", {"action": "reboot"}, self.error("unknown_action", "Unknown action"))
        elif kind == 5:
            self.ask("bad: model type", {"action": "load_model", "model_type": "llama", "model_path": small},
                     self.error("unsupported_model_type", "Unsupported model_type: llama"))
        elif kind == 6:
            self.ask("bad: no input_data", {"action": "infer", "model_type": "generic", "model_path": small},
                     self.error("bad_request", "model_path and input_data required"))
        else:
            self.malformed_json()

    def malformed_json(self) -> None:
        """Not JSON at all: answered bad_request (no request_id to echo), connection still usable."""
        try:
            conn = self.connection()
            conn.sock.sendall(frame(b'{"action": "ping", "request_id": '))
            answer = conn.read()
        except (Lost, OSError) as exc:
            self.tally.add("bad: malformed JSON", "lost", str(exc))
            self._reconnect()
            return
        ok = answer.get("code") == "bad_request" and "request_id" not in answer
        self.tally.add("bad: malformed JSON", "expected bad_request" if ok else "unexpected", str(answer)[:200])

    def disconnect(self) -> None:
        """Leave abruptly on a connection of its own: mid-frame, right after a request, or after too_large."""
        kind = self.random.randrange(3)
        with self.tally.lock:
            self.tally.disconnects += 1
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(ANSWER_TIMEOUT_S)
                sock.connect(self.sock_path)
                if kind == 0:  # a header and half a body, then gone
                    body = json.dumps({"action": "infer", **self.model("generic"),
                                       "input_data": {"inputs": {"x": tensor("uint8", [4], bytes(4))}}}).encode()
                    sock.sendall(struct.pack(">I", len(body)) + body[:len(body) // 2])
                    self.tally.add("disconnect mid-frame", "ok")
                elif kind == 1:  # a whole request, gone before the answer
                    sock.sendall(frame({"action": "infer", **self.model("depth"),
                                        "input_data": {"input": tensor("uint8", [4], bytes(4))}}))
                    self.tally.add("disconnect before the answer", "ok")
                else:  # a length over max_message_bytes: answered too_large, then closed by the daemon
                    sock.sendall(struct.pack(">I", 1024 * 1024 + 1) + b"{")
                    conn = Conn.__new__(Conn)
                    conn.sock = sock
                    answer = conn.read()
                    closed = sock.recv(1) == b""
                    good = answer.get("code") == "too_large" and closed
                    self.tally.add("too_large, then closed", "expected too_large" if good else "unexpected",
                                   str(answer)[:200])
        except (Lost, OSError) as exc:
            self.tally.add(f"disconnect {kind}", "lost", str(exc))

    def run(self) -> None:
        scenarios = [(self.infer, 40), (self.control, 18), (self.load, 8), (self.unload, 6), (self.bad, 20),
                     (self.disconnect, 5)]
        actions, weights = zip(*scenarios)
        try:
            while time.monotonic() < self.deadline:
                self.random.choices(actions, weights)[0]()
        except Exception as exc:  # a bug in the soak itself must show, not hang the run
            self.tally.add("client crashed", "unexpected", repr(exc))
        finally:
            self._reconnect()


# ------------------------------------------------------------------ the run

def sampler(pid: int, stop: threading.Event, samples: list, started: float) -> None:
    while not stop.is_set():
        rss, fds = rss_kb(pid), fd_count(pid)
        if rss is not None and fds is not None:
            samples.append((time.monotonic() - started, rss, fds))
        stop.wait(SAMPLE_EVERY_S)


def steady_fds(pid: int, timeout: float = 5.0) -> int:
    """Descriptors once the count stops moving (two readings 0.2 s apart agree)."""
    deadline = time.monotonic() + timeout
    count = fd_count(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = fd_count(pid)
        if again == count:
            break
        count = again
    return count if count is not None else -1


def settle_fds(pid: int, target: int, timeout: float = 10.0) -> int:
    """Descriptors once the daemon has closed what clients left (waits, with a deadline)."""
    deadline = time.monotonic() + timeout
    count = fd_count(pid)
    while count is not None and count > target and time.monotonic() < deadline:
        time.sleep(0.05)
        count = fd_count(pid)
    return count if count is not None else -1


def unload_everything(sock: str, paths: dict) -> None:
    conn = Conn(sock)
    try:
        for model_type in MODEL_TYPES:
            path = {"vlm": paths["vlm"], "vlm_chat": paths["vlm"], "whisper": paths["speech"]}.get(
                model_type, paths["small"])
            conn.ask({"action": "unload_model", "model_type": model_type, "model_path": path})
        answer = conn.ask({"action": "status"})
        if answer.get("loaded_models"):
            raise RuntimeError(f"models still loaded after unloading all: {answer['loaded_models']}")
    finally:
        conn.close()


def run(seconds: float = 120.0, clients: int = 32, seed: int = 1, quiet: bool = False) -> dict:
    """Run the soak; returns the figures (``ok`` False on a correctness failure)."""
    with tempfile.TemporaryDirectory(prefix="hailo-devmgr-soak-") as folder:
        root = Path(folder)
        paths, config_path, sock = write_setup(root, clients)
        with running_daemon(root, config_path, sock) as process:
            pid = process.pid
            probe = Conn(sock)
            probe.ask({"action": "ping"})
            probe.close()
            fds_start = steady_fds(pid)  # no model loaded, no client: the baseline
            started = time.monotonic()
            samples: list = []
            stop = threading.Event()
            watcher = threading.Thread(target=sampler, args=(pid, stop, samples, started), daemon=True)
            watcher.start()
            tally = Tally()
            references: dict = {}
            threads = [Client(i, sock, paths, started + seconds, tally, references, seed) for i in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(seconds + 2 * ANSWER_TIMEOUT_S)
            hung = sum(thread.is_alive() for thread in threads)
            elapsed = time.monotonic() - started
            stop.set()
            watcher.join(5)
            rss_during = samples[-1][1] if samples else None
            unload_everything(sock, paths)
            fds_end = settle_fds(pid, fds_start)
            alive = process.poll() is None
            log_text = (root / "daemon.log").read_text(errors="replace")
    return report_figures(seconds, clients, elapsed, tally, samples, rss_during, fds_start, fds_end, hung,
                          alive, log_text)


def report_figures(seconds, clients, elapsed, tally, samples, rss_end, fds_start, fds_end, hung, alive,
                   log_text) -> dict:
    warmup_s = min(max(2.0, seconds * 0.2), 30.0)
    after = [sample for sample in samples if sample[0] >= warmup_s] or samples
    rss_start = after[0][1] if after else None
    rss_max = max(sample[1] for sample in samples) if samples else None
    growth = (rss_end - rss_start) / rss_start if rss_start and rss_end else None
    fds_max = max(sample[2] for sample in samples) if samples else None
    # RSS at each tenth of the run: a plateau and a steady climb look different.
    series = [min(samples, key=lambda sample: abs(sample[0] - elapsed * tenth / 10))[1]
              for tenth in range(11)] if samples else []
    lost, crossed, unexpected = (tally.outcomes[kind] for kind in ("lost", "crossed", "unexpected"))
    unexpected += hung
    total = sum(tally.requests.values())
    fd_leak = fds_end > fds_start
    figures = {
        "seconds": round(elapsed, 1), "clients": clients, "requests": total,
        "requests_per_s": round(total / elapsed, 1) if elapsed else None,
        "outcomes": dict(sorted(tally.outcomes.items())), "scenarios": dict(sorted(tally.requests.items())),
        "disconnects": tally.disconnects, "lost": lost, "crossed": crossed, "unexpected": unexpected,
        "hung_clients": hung, "rss_kb": {"start": rss_start, "end": rss_end, "max": rss_max,
                                         "warmup_s": warmup_s},
        "rss_series_kb": series,
        "rss_growth": round(growth, 4) if growth is not None else None,
        "rss_verdict": "flat" if growth is not None and growth < RSS_FLAT_LIMIT else "growing",
        "fds": {"start": fds_start, "end": fds_end, "max": fds_max}, "fd_leak": fd_leak,
        "daemon_alive": alive, "daemon_tracebacks": log_text.count("Traceback"),
        "problems": tally.problems,
    }
    figures["ok"] = not (lost or crossed or unexpected or fd_leak or not alive)
    if not figures["ok"] or figures["daemon_tracebacks"]:
        figures["daemon_log_tail"] = log_text.splitlines()[-40:]
    return figures


def print_table(figures: dict) -> None:
    rss, fds = figures["rss_kb"], figures["fds"]
    rows = [
        ("duration", f"{figures['seconds']} s, {figures['clients']} clients"),
        ("requests", f"{figures['requests']} ({figures['requests_per_s']}/s), "
                     f"{figures['disconnects']} abrupt disconnects"),
    ]
    rows += [(f"  {outcome}", str(count)) for outcome, count in figures["outcomes"].items()]
    rows += [
        ("lost / crossed / unexpected", f"{figures['lost']} / {figures['crossed']} / {figures['unexpected']}"),
        ("RSS start / end / max", f"{rss['start']} / {rss['end']} / {rss['max']} KiB "
                                   f"(start = after {rss['warmup_s']:g} s warm-up)"),
        ("RSS verdict", f"{figures['rss_verdict']} ({(figures['rss_growth'] or 0) * 100:+.1f}% after warm-up)"),
        ("RSS every tenth", " ".join(str(kb // 1024) for kb in figures["rss_series_kb"]) + " MiB"),
        ("fds start / end / max", f"{fds['start']} / {fds['end']} / {fds['max']}"
                                   f"{'  LEAK' if figures['fd_leak'] else ''}"),
        ("daemon", f"{'alive' if figures['daemon_alive'] else 'DEAD'}, "
                   f"{figures['daemon_tracebacks']} traceback(s) in its log"),
        ("verdict", "PASS" if figures["ok"] else "FAIL"),
    ]
    width = max(len(name) for name, _ in rows)
    print("soak: hailo-device-manager on the simulated backend")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")
    print("  scenarios:")
    for scenario, count in figures["scenarios"].items():
        print(f"    {scenario}: {count}")
    for problem in figures["problems"]:
        print(f"  ! {problem}")
    if figures.get("daemon_log_tail"):
        print("  daemon log (last lines):")
        for line in figures["daemon_log_tail"]:
            print(f"    {line}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS") or 120))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run(args.seconds, args.clients, args.seed)
    print_table(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
