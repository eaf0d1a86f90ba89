#!/usr/bin/python3
"""Small requests, our daemon next to the reference daemon (issue 16, "Speed").

Starts, in one run, ``python3 -m hailo_devmgr`` on the simulated backend
(``infer_ms: 0``, ``load_ms: 0``, a ``generic`` model of 16 uint8 in and
16 uint8 out) and ``bench/reference_daemon.py`` (asyncio framing, JSON,
each infer handed to one worker thread and back), then measures both with
raw protocol-v1 clients running in their own *processes* (plain sockets,
one request at a time, no client library), in rounds that alternate which
daemon goes first; each figure is the median over the rounds:

  (a) small ``infer`` throughput, 8 client processes, ``--seconds`` each;
  (b) small ``infer`` latency p50 / p99, one client;
  (c) ``ping`` latency p50 / p99, one client;
  (d) our daemon's idle RSS after start and one ``load_model``, from the
      checkout and as the .deb ships it (``make deb``, unpacked, started by
      its ``/usr/bin/hailo-device-manager``);
  (e) a hostile-connection storm against our daemon (3,000 connections from
      4 processes, 8 open at once in each: random bytes, headers claiming up to 4 GiB then closing,
      truncated bodies, bad JSON, oversized shapes), with its RSS before,
      right after, 5 s after, and whether it still answers.

Ratios are the ones of the issue's goals: throughput ours/reference >= 0.5,
one-client infer p50 and ping p50 ours/reference <= 2, RSS 5 s after the
storm within 15 MB of before. A missed goal prints MISS and never changes
the exit status. Both daemons are always stopped (SIGTERM to their pids).

    make bench                                         # runs it after the others
    PYTHONPATH=src /usr/bin/python3 bench/small_requests.py           # about 2 min
    PYTHONPATH=src /usr/bin/python3 bench/small_requests.py --quick   # about 40 s
    PYTHONPATH=src /usr/bin/python3 bench/small_requests.py --json out.json
"""
from __future__ import annotations

import argparse
import base64
import collections
import compileall
import contextlib
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
HEADER = struct.Struct(">I")
MODEL = ("inputs: [{name: x, shape: [16], format: UINT8}]\n"
         "outputs: [{name: y, shape: [16], format: UINT8}]\nmemory_mb: 1\n")
INPUT_B64 = base64.b64encode(bytes(range(16))).decode()
START_TIMEOUT_S = 20
CLIENT_TIMEOUT_S = 10
WARMUP = 50
MiB = 1024 * 1024

SETTINGS = {
    "default": {"rounds": 3, "seconds": 5.0, "latency_s": 4.0, "ping_s": 3.0, "clients": 8,
                "storm": 3000, "storm_procs": 4, "storm_batch": 8, "storm_s": 60.0, "settle_s": 5.0},
    "quick": {"rounds": 1, "seconds": 3.0, "latency_s": 2.0, "ping_s": 2.0, "clients": 8,
              "storm": 1000, "storm_procs": 4, "storm_batch": 8, "storm_s": 30.0, "settle_s": 5.0},
}
GOALS = {"throughput": 0.5, "infer_p50": 2.0, "ping_p50": 2.0, "storm_mb": 15.0}


# -- wire (protocol v1: 4-byte big-endian length, JSON body)

def frame(message: dict) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = sock.recv(size, socket.MSG_WAITALL)
    while len(data) < size:  # MSG_WAITALL may still return short (signals)
        more = sock.recv(size - len(data))
        if not more:
            raise ConnectionError(f"daemon closed the connection ({len(data)} of {size} bytes read)")
        data += more
    return data


def call(sock: socket.socket, request: bytes) -> bytes:
    sock.sendall(request)
    (size,) = HEADER.unpack(recv_exact(sock, 4))
    return recv_exact(sock, size)


def request_maker(action: str, model: str):
    """A cheap ``n -> frame`` for the loop (the client must not be the bottleneck)."""
    message = {"action": action}
    if action == "infer":
        message.update(model_path=model, model_type="generic", input_data={"inputs": {"x": {
            "dtype": "uint8", "shape": [16], "data_b64": INPUT_B64}}})
    prefix = json.dumps(message, separators=(",", ":"))[:-1].encode() + b',"request_id":'

    def make(n: int) -> bytes:
        body = prefix + str(n).encode() + b"}"
        return HEADER.pack(len(body)) + body
    return make


def connect(path: str, timeout: float = CLIENT_TIMEOUT_S) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


# -- client processes

def client_process(path: str, action: str, model: str, start_at: float, seconds: float,
                   record: bool, out) -> None:
    """One raw v1 client: warm up, then request, wait, repeat until the end."""
    try:
        make = request_maker(action, model)
        with connect(path) as sock:
            for n in range(WARMUP):
                answer = call(sock, make(n))
                if b'"status":"ok"' not in answer:
                    raise RuntimeError(f"warm-up answer: {answer[:300]!r}")
            time.sleep(max(0.0, start_at - time.monotonic()))
            begin = time.monotonic()
            end = max(begin, start_at) + seconds
            latencies, ok, errors, first_error, n = [], 0, 0, None, WARMUP
            while time.monotonic() < end:
                request = make(n)
                n += 1
                t0 = time.perf_counter_ns()
                answer = call(sock, request)
                t1 = time.perf_counter_ns()
                if b'"status":"ok"' in answer:
                    ok += 1
                    if record:
                        latencies.append(t1 - t0)
                else:
                    errors += 1
                    first_error = first_error or answer[:300].decode(errors="replace")
            out.put({"ok": ok, "errors": errors, "first_error": first_error,
                     "elapsed": time.monotonic() - begin, "late": begin - start_at,
                     "latencies": latencies})
    except Exception as exc:
        out.put({"failed": f"{type(exc).__name__}: {exc}"})


def run_clients(path: str, action: str, model: str, count: int, seconds: float,
                record: bool, pid: int) -> dict:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    start_at = time.monotonic() + 0.5 + 0.1 * count
    procs = [ctx.Process(target=client_process, daemon=True,
                         args=(path, action, model, start_at, seconds, record, out))
             for _ in range(count)]
    for proc in procs:
        proc.start()
    try:
        time.sleep(max(0.0, start_at - time.monotonic()))
        cpu_before, loop_before = cpu_seconds(pid), cpu_seconds(pid, thread=pid)
        time.sleep(seconds)
        cpu_after, loop_after = cpu_seconds(pid), cpu_seconds(pid, thread=pid)
        results = [out.get(timeout=seconds + 3 * CLIENT_TIMEOUT_S) for _ in procs]
    finally:
        reap(procs)
    failed = [r["failed"] for r in results if "failed" in r]
    if failed:
        raise RuntimeError(f"{len(failed)} of {count} {action} clients failed, first: {failed[0]}")
    ok = sum(r["ok"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies"])
    return {
        "rate": sum(r["ok"] / r["elapsed"] for r in results),
        "ok": ok, "errors": sum(r["errors"] for r in results),
        "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
        "late_s": max(r["late"] for r in results),
        "p50_ms": percentile(latencies, 50) / 1e6 if latencies else None,
        "p99_ms": percentile(latencies, 99) / 1e6 if latencies else None,
        "cpu_us": (cpu_after - cpu_before) * 1e6 / ok if ok else None,
        "loop_cpu_us": (loop_after - loop_before) * 1e6 / ok if ok else None,
    }


# -- the hostile-connection storm

def hostile_random_bytes(sock, rnd, model):
    sock.sendall(os.urandom(rnd.randint(1, 16384)))          # its first 4 bytes are a random length


def hostile_big_header(sock, rnd, model):
    claimed = min(0xFFFFFFFF, int(2 ** rnd.uniform(16, 32)))  # 64 KiB ... 4 GiB, log-uniform
    sock.sendall(HEADER.pack(claimed) + os.urandom(rnd.choice((0, 100, 4096, 65536))))


def hostile_truncated(sock, rnd, model):
    data = "A" * rnd.choice((1000, 100_000, 1_000_000))
    body = json.dumps({"action": "infer", "model_path": model, "model_type": "generic",
                       "input_data": {"inputs": {"x": {"dtype": "uint8", "shape": [16],
                                                       "data_b64": data}}}}).encode()
    claimed = max(len(body), int(2 ** rnd.uniform(10, 26)))  # up to 64 MiB, the default limit
    sock.sendall(HEADER.pack(claimed) + body[:rnd.randint(0, len(body) - 1)])


def hostile_bad_json(sock, rnd, model):
    body = rnd.choice((
        b'{"action":"infer","model_path":' + b"[" * rnd.randint(1, 50000),
        b'{"action":"ping"' + b" " * rnd.randint(0, 100000),
        os.urandom(rnd.randint(1, 100000)),
        b'[1,2,3]', b'"just a string"', b'\xff\xfe{"action":"ping"}',
        b'{"action":"infer","input_data":' + b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"}",
    ))
    sock.sendall(HEADER.pack(len(body)) + body)
    return True


def hostile_shape(sock, rnd, model):
    shape = rnd.choice(([65536, 65536, 3], [2 ** 40], [-1, 16], [1] * 9, [2 ** 31, 2 ** 31],
                        [16, 0], [1e9], ["16"], [16] * 8))
    data = "A" * rnd.choice((4, 24, 4_000_000))
    request = {"action": "infer", "model_path": model, "model_type": "generic",
               "input_data": {"inputs": {"x": {"dtype": rnd.choice(("uint8", "float32", "complex128")),
                                               "shape": shape, "data_b64": data}}}, "request_id": 1}
    sock.sendall(frame(request))
    return True


HOSTILE = {"random bytes": hostile_random_bytes, "big header": hostile_big_header,
           "truncated body": hostile_truncated, "bad JSON": hostile_bad_json,
           "oversized shape": hostile_shape}


def reap(procs) -> None:
    """Wait a little for client processes, then kill what is left."""
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def storm_process(path: str, model: str, count: int, batch: int, seed: int, deadline: float, out) -> None:
    """``count`` hostile connections, ``batch`` open at once: all sent, then
    the answers of bad JSON and bad shapes read (the others just close)."""
    rnd = random.Random(seed)
    tally = collections.Counter()
    for first in range(0, count, batch):
        if time.monotonic() > deadline:
            tally["not run (storm out of time)"] += min(batch, count - first)
            continue
        opened = []
        for _ in range(min(batch, count - first)):
            kind = rnd.choice(list(HOSTILE))
            sock = None
            try:
                sock = connect(path, timeout=2.0)
                opened.append((sock, HOSTILE[kind](sock, rnd, model)))
                tally[kind] += 1
            except OSError as exc:  # the daemon closing on us mid-send is expected
                tally[f"{kind} ({type(exc).__name__})"] += 1
                if sock is not None:
                    sock.close()
        for sock, wants_answer in opened:
            if wants_answer:
                with contextlib.suppress(OSError):
                    sock.recv(65536)
            sock.close()
    out.put(dict(tally))


def storm(path: str, model: str, pid: int, cfg: dict) -> dict:
    rss_before = rss_mib(pid)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    per_proc = cfg["storm"] // cfg["storm_procs"]
    deadline = time.monotonic() + cfg["storm_s"]
    begin = time.monotonic()
    procs = [ctx.Process(target=storm_process, daemon=True,
                         args=(path, model, per_proc, cfg["storm_batch"], 1000 + i, deadline, out))
             for i in range(cfg["storm_procs"])]
    for proc in procs:
        proc.start()
    tally = collections.Counter()
    try:
        for _ in procs:
            tally.update(out.get(timeout=cfg["storm_s"] + 30))
    finally:
        reap(procs)
    took = time.monotonic() - begin
    rss_right_after = rss_mib(pid)
    time.sleep(cfg["settle_s"])
    rss_later = rss_mib(pid)
    alive = still_answers(path, model)
    return {"connections": per_proc * cfg["storm_procs"], "seconds": took, "tally": dict(tally),
            "rss_before": rss_before, "rss_right_after": rss_right_after, "rss_after_settle": rss_later,
            "rss_peak": peak_rss_mib(pid), "still_answers": alive}


def still_answers(path: str, model: str) -> str:
    try:
        with connect(path, timeout=5.0) as sock:
            for action in ("ping", "infer"):
                answer = call(sock, request_maker(action, model)(1))
                if b'"status":"ok"' not in answer:
                    return f"{action}: {answer[:200]!r}"
        return "yes"
    except Exception as exc:
        return f"no: {type(exc).__name__}: {exc}"


# -- /proc

def proc_status(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise KeyError(key)


def rss_mib(pid: int) -> float:
    return proc_status(pid, "VmRSS")


def peak_rss_mib(pid: int) -> float:
    return proc_status(pid, "VmHWM")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU time of the process, or of one of its threads (the main thread,
    which runs the event loop in both daemons, has the process's id)."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def percentile(sorted_values: list, pct: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


# -- the daemons

def write_setup(root: Path) -> tuple[str, Path, str, str]:
    models = root / "models"
    models.mkdir()
    model = models / "tiny16.hef"
    model.write_text(MODEL)
    ours, ref = str(root / "ours.sock"), str(root / "reference.sock")
    config = {"backend": "simulated", "socket_path": ours, "model_dirs": [str(models)],
              "log_level": "warning",
              "simulated": {"infer_ms": 0, "load_ms": 0, "lock_path": str(root / "device.lock")}}
    config_path = root / "config.yaml"
    config_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return str(model), config_path, ours, ref


def wait_for_socket(path: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), connect(path, timeout=1.0):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {path} after {START_TIMEOUT_S} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def started(argv: list, sock: str, log: Path, env: dict):
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        wait_for_socket(sock, process, log)
        yield process
    finally:
        stop(process)


def daemon_env() -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HAILO_DEVICE_", "LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def packaged_idle_rss(root: Path, model: str, config_path: Path, env: dict) -> float | str:
    """Idle RSS (MiB) of the daemon as the .deb ships it, or why it could not be
    measured: built by ``make deb``, unpacked with ``dpkg-deb -x`` and byte-compiled
    (as dh_python3 does on install), started by its own ``/usr/bin`` command, which
    is what systemd runs. The checkout's figure alone missed what only the
    installed files import (importlib.metadata: 1.5 MiB)."""
    debs, tree = root / "debs", root / "packaged"
    try:
        built = subprocess.run(["make", "-C", str(ROOT), "deb", f"DEB_DIR={debs}"], capture_output=True,
                               text=True, env={**os.environ, "HOME": str(debs.parent)}, timeout=900)
        if built.returncode != 0:   # the Makefile says what is missing on stdout
            said = (built.stdout + built.stderr).strip().splitlines()[-3:]
            return f"make deb failed ({built.returncode}): " + " / ".join(said)
        for deb in debs.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, capture_output=True)
        site = tree / "usr" / "lib" / "python3" / "dist-packages"
        compileall.compile_dir(str(site), quiet=1)
        sock = str(root / "packaged.sock")
        packaged_env = {**env, "PYTHONPATH": str(site), "HAILO_DEVICE_SOCKET": sock}
        with started([str(tree / "usr" / "bin" / "hailo-device-manager"), "--config", str(config_path)], sock,
                     root / "packaged.log", packaged_env) as process:
            load(sock, model)
            time.sleep(0.5)
            return rss_mib(process.pid)
    except (OSError, subprocess.SubprocessError, RuntimeError, TimeoutError) as failure:
        return f"{type(failure).__name__}: {str(failure).strip()[-300:]}"


def load(path: str, model: str) -> None:
    with connect(path, timeout=30) as sock:
        answer = call(sock, frame({"action": "load_model", "model_path": model,
                                   "model_type": "generic", "request_id": 1}))
    if b'"status":"ok"' not in answer:
        raise RuntimeError(f"load_model on {path}: {answer[:300]!r}")


# -- report

def verdict(value, goal, below: bool) -> str:
    if value is None:
        return "?"
    return "PASS" if (value <= goal if below else value >= goal) else "MISS"


def fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(rss_idle: dict, storm_result: dict | None, rounds: list, cfg: dict) -> None:
    def median(daemon, test, key):
        values = [r[daemon][test][key] for r in rounds if r[daemon][test][key] is not None]
        return statistics.median(values) if values else None

    def ratio(test, key):
        ours, ref = median("ours", test, key), median("reference", test, key)
        return ours / ref if ours is not None and ref else None

    lines = [("measurement", "ours", "reference", "ours/ref", "goal", "")]

    def row(label, test, key, digits, goal=None, below=True):
        value = ratio(test, key)
        goal_text = "" if goal is None else (f"<= {goal:g}" if below else f">= {goal:g}")
        lines.append((label, fmt(median("ours", test, key), digits), fmt(median("reference", test, key), digits),
                      fmt(value, 2), goal_text, "" if goal is None else verdict(value, goal, below)))

    n = cfg["clients"]
    row(f"small infer, {n} client procs (req/s)", "infer8", "rate", 0, GOALS["throughput"], below=False)
    row(f"  daemon CPU per request, {n} procs (us)", "infer8", "cpu_us", 0)
    row("    of which the event-loop thread (us)", "infer8", "loop_cpu_us", 0)
    row(f"  latency p50, {n} procs (ms)", "infer8", "p50_ms", 3)
    row("small infer, 1 client p50 (ms)", "infer1", "p50_ms", 3, GOALS["infer_p50"])
    row("small infer, 1 client p99 (ms)", "infer1", "p99_ms", 3)
    row("small infer, 1 client (req/s)", "infer1", "rate", 0)
    row("ping, 1 client p50 (ms)", "ping1", "p50_ms", 3, GOALS["ping_p50"])
    row("ping, 1 client p99 (ms)", "ping1", "p99_ms", 3)
    lines.append(("idle RSS after start + one load (MiB)", fmt(rss_idle["ours"], 1),
                  fmt(rss_idle["reference"], 1), "", "<= 43 (ours)",
                  verdict(rss_idle["ours"], 43.0, True)))
    packaged = rss_idle["packaged"]
    measured = isinstance(packaged, float)
    lines.append(("  the same, as packaged (.deb) (MiB)", fmt(packaged, 1) if measured else "-", "", "",
                  "<= 43", verdict(packaged if measured else None, 43.0, True)))
    widths = [max(len(line[i]) for line in lines) for i in range(6)]
    print()
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j])
                        for j, cell in enumerate(line)).rstrip())
        if i == 0:
            print("-" * (sum(widths) + 10))
    if not measured:
        print(f"idle RSS as packaged not measured: {packaged}")
    print(f"\nmedians of {len(rounds)} round(s); per round (ours / reference):")
    for i, r in enumerate(rounds, 1):
        print(f"  round {i}: {n} procs {r['ours']['infer8']['rate']:.0f} / {r['reference']['infer8']['rate']:.0f} req/s;"
              f" 1 client p50 {fmt(r['ours']['infer1']['p50_ms'])} / {fmt(r['reference']['infer1']['p50_ms'])} ms;"
              f" ping p50 {fmt(r['ours']['ping1']['p50_ms'])} / {fmt(r['reference']['ping1']['p50_ms'])} ms")
    errors = [(d, t, r[d][t]) for r in rounds for d in ("ours", "reference") for t in r[d] if r[d][t]["errors"]]
    for daemon, test, result in errors:
        print(f"  {daemon} {test}: {result['errors']} error answers, first: {result['first_error']}")
    if storm_result:
        s = storm_result
        growth = s["rss_after_settle"] - s["rss_before"]
        print(f"\nhostile storm against our daemon: {s['connections']} connections in {s['seconds']:.1f} s "
              f"from {cfg['storm_procs']} processes, {cfg['storm_batch']} open at once each")
        print("  " + ", ".join(f"{kind}: {count}" for kind, count in sorted(s["tally"].items())))
        print(f"  RSS before {s['rss_before']:.1f} MiB, right after {s['rss_right_after']:.1f} MiB, "
              f"{cfg['settle_s']:g} s after {s['rss_after_settle']:.1f} MiB (peak VmHWM {s['rss_peak']:.1f} MiB)")
        print(f"  growth {growth:+.1f} MiB (goal <= {GOALS['storm_mb']:g}): "
              f"{verdict(growth, GOALS['storm_mb'], True)}; still answers ping and infer: {s['still_answers']}")


def measure_round(which: list, sockets: dict, pids: dict, model: str, cfg: dict) -> dict:
    result = {}
    for daemon in which:
        path, pid = sockets[daemon], pids[daemon]
        result[daemon] = {
            "infer8": run_clients(path, "infer", model, cfg["clients"], cfg["seconds"], True, pid),
            "infer1": run_clients(path, "infer", model, 1, cfg["latency_s"], True, pid),
            "ping1": run_clients(path, "ping", model, 1, cfg["ping_s"], True, pid),
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description="small requests: our daemon vs the reference daemon")
    parser.add_argument("--quick", action="store_true", help="one round, shorter runs, a smaller storm")
    parser.add_argument("--no-storm", action="store_true", help="skip the hostile-connection storm")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    cfg = SETTINGS["quick" if args.quick else "default"]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the daemons are stopped
    # Byte-compiled first, as the .deb installs it (dh_python3): a daemon that
    # compiles its sources at start (PYTHONDONTWRITEBYTECODE, a fresh clone)
    # keeps about 3 MiB more of its heap, which idle RSS would count.
    compileall.compile_dir(str(SRC), quiet=1)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-small-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        model, config_path, ours_sock, ref_sock = write_setup(root)
        env = daemon_env()
        # First and alone: it uses the same simulated device (one process at a time).
        packaged_rss = packaged_idle_rss(root, model, config_path, env)
        ours = stack.enter_context(started([sys.executable, "-m", "hailo_devmgr", "--config", str(config_path)],
                                           ours_sock, root / "ours.log", env))
        ref = stack.enter_context(started([sys.executable, str(Path(__file__).with_name("reference_daemon.py")),
                                           "--socket", ref_sock], ref_sock, root / "reference.log", env))
        sockets = {"ours": ours_sock, "reference": ref_sock}
        pids = {"ours": ours.pid, "reference": ref.pid}
        for path in sockets.values():
            load(path, model)
        time.sleep(0.5)
        rss_idle = {**{daemon: rss_mib(pid) for daemon, pid in pids.items()}, "packaged": packaged_rss}
        print(f"daemons: ours pid {ours.pid}, reference pid {ref.pid}; {os.cpu_count()} CPUs; "
              f"Python {sys.version.split()[0]}; {cfg['rounds']} round(s)", flush=True)
        rounds = []
        for i in range(cfg["rounds"]):
            order = ["ours", "reference"] if i % 2 == 0 else ["reference", "ours"]
            rounds.append(measure_round(order, sockets, pids, model, cfg))
            print(f"round {i + 1} done ({time.monotonic() - began:.0f} s)", flush=True)
        storm_result = None if args.no_storm else storm(ours_sock, model, ours.pid, cfg)
        daemon_exit = ours.poll()
        report(rss_idle, storm_result, rounds, cfg)
        if daemon_exit is not None:
            print(f"\nour daemon exited during the bench with {daemon_exit}:\n"
                  f"{(root / 'ours.log').read_text(errors='replace')[-3000:]}")
        log_tail = (root / "ours.log").read_text(errors="replace").strip().splitlines()
        if log_tail:
            print(f"\nour daemon's log: {len(log_tail)} lines, the last ones:\n  " + "\n  ".join(log_tail[-5:]))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": cfg, "rss_idle_mib": rss_idle, "rounds": rounds,
                                               "storm": storm_result}, indent=1, default=str))
    print(f"\ntook {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
