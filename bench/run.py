#!/usr/bin/python3
"""Benchmark of the device manager on the simulated backend.

Starts the daemon as a real process (as the tests do), then measures:
ping round-trips on an idle daemon and while the device runs a long
inference, and small-``infer`` throughput with 1 and 8 clients.
Prints a table; ``--json FILE`` also writes the figures. A missed goal
is reported (MISS) but never changes the exit status.

    make bench                      # or: PYTHONPATH=src python3 bench/run.py
    PYTHONPATH=src python3 bench/run.py --quick --json /tmp/bench.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from hailo_devmgr.client import Client, tensor  # noqa: E402

TINY_HEF = ("inputs: [{name: x, shape: [16], format: UINT8}]\n"
            "outputs: [{name: y, shape: [16], format: FLOAT32}]\nmemory_mb: 1\n")
PING_GOAL_US = 1000.0
START_TIMEOUT_S = 20
CLIENT_TIMEOUT_S = 30

SETTINGS = {
    "default": {"warmup": 100, "pings": 2000, "busy_ms": 2000, "infer_s": 5.0},
    "quick": {"warmup": 50, "pings": 500, "busy_ms": 1000, "infer_s": 3.0},
}


# -- the daemon

def write_setup(root: Path) -> tuple[Path, Path, str]:
    """Model folder and config in ``root``; returns (models, config, socket)."""
    models = root / "models"
    models.mkdir()
    (models / "net.hef").write_text("simulated HEF: default network\n")
    (models / "tiny.hef").write_text(TINY_HEF)
    sock = str(root / "device.sock")
    config = {
        "backend": "simulated", "socket_path": sock, "model_dirs": [str(models)],
        "log_level": "warning",
        "simulated": {"load_ms": 0, "infer_ms": 0, "lock_path": str(root / "device.lock")},
    }
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return models, config_path, sock


def daemon_env() -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HAILO_DEVICE_", "LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def wait_for_socket(path: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daemon exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(path)
            return
        time.sleep(0.02)
    raise TimeoutError(f"no daemon on {path} after {START_TIMEOUT_S} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_daemon(root: Path, config_path: Path, sock: str):
    """The daemon as a subprocess; always stopped with SIGTERM on exit."""
    log_path = root / "daemon.log"
    with open(log_path, "wb") as log:
        argv = [sys.executable, "-m", "hailo_devmgr", "--config", str(config_path)]
        process = subprocess.Popen(argv, env=daemon_env(), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        try:
            wait_for_socket(sock, process)
            yield process
        except Exception:
            log.flush()
            sys.stderr.write(f"--- daemon log ---\n{log_path.read_text(errors='replace')}\n")
            raise
        finally:
            stop(process)


# -- statistics

def summary(samples_ns: list[int], scale: float) -> dict:
    """p50, p99 and mean of nanosecond samples, divided by ``scale``."""
    if not samples_ns:
        return {"n": 0, "p50": None, "p99": None, "mean": None}
    values = np.asarray(samples_ns, dtype=np.float64) / scale
    return {"n": len(values), "p50": float(np.percentile(values, 50)),
            "p99": float(np.percentile(values, 99)), "mean": float(values.mean())}


def timed_pings(client: Client, count: int, until_ns: int | None = None) -> list[tuple[int, int]]:
    """(start, end) perf_counter_ns of up to ``count`` pings, stopping at ``until_ns``."""
    spans = []
    for _ in range(count):
        start = time.perf_counter_ns()
        if until_ns is not None and start >= until_ns:
            break
        client.ping()
        spans.append((start, time.perf_counter_ns()))
    return spans


# -- ping on an idle and on a busy daemon

def bench_ping_idle(sock: str, cfg: dict) -> dict:
    with Client(sock, timeout=CLIENT_TIMEOUT_S) as client:
        timed_pings(client, cfg["warmup"])
        spans = timed_pings(client, cfg["pings"])
    return summary([end - start for start, end in spans], 1e3)


def slow_infer(sock: str, path: str, busy_ms: int, done: dict) -> None:
    """One long simulated inference; records when its answer arrived."""
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    try:
        with Client(sock, timeout=CLIENT_TIMEOUT_S + busy_ms / 1000) as client:
            client.infer(path, {"inputs": {"input_layer1": tensor(image)}}, model_type="generic",
                         model_params={"simulate_ms": busy_ms}, decode=False)
    except Exception as exc:  # reported by the caller
        done["error"] = exc
    finally:
        done["end_ns"] = time.perf_counter_ns()


def wait_until_busy(client: Client, worker: threading.Thread) -> None:
    deadline = time.monotonic() + 10
    while not (client.status().get("device_busy_with") or "").startswith("infer"):
        if not worker.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the slow inference never started")
        time.sleep(0.001)


def bench_ping_busy(sock: str, models: Path, cfg: dict) -> dict:
    path, done = str(models / "net.hef"), {}
    with Client(sock, timeout=CLIENT_TIMEOUT_S) as client:
        client.load_model(path, "generic")
        timed_pings(client, cfg["warmup"])
        worker = threading.Thread(target=slow_infer, args=(sock, path, cfg["busy_ms"], done), daemon=True)
        begin_ns = time.perf_counter_ns()
        worker.start()
        wait_until_busy(client, worker)
        spans = timed_pings(client, cfg["pings"], until_ns=begin_ns + cfg["busy_ms"] * 1_000_000)
        worker.join()
    if "error" in done:
        raise RuntimeError(f"slow inference failed: {done['error']}")
    # Count only pings answered while the inference still held the device.
    return summary([end - start for start, end in spans if end <= done["end_ns"]], 1e3)


# -- small-infer throughput

def infer_worker(sock: str, path: str, barrier: threading.Barrier, run: dict, out: list) -> None:
    request = {"inputs": {"x": tensor(np.arange(16, dtype=np.uint8))}}
    try:
        with Client(sock, timeout=CLIENT_TIMEOUT_S) as client:
            client.infer(path, request, model_type="generic")  # warm-up, connection open
            barrier.wait()
            while (start := time.perf_counter_ns()) < run["until_ns"]:
                client.infer(path, request, model_type="generic")
                out.append(time.perf_counter_ns() - start)
    except Exception as exc:
        run.setdefault("errors", []).append(exc)
        barrier.abort()  # the other clients stop waiting


def bench_infer(sock: str, models: Path, clients: int, seconds: float) -> dict:
    path = str(models / "tiny.hef")
    with Client(sock, timeout=CLIENT_TIMEOUT_S) as client:
        client.load_model(path, "generic")
    run, results = {}, [[] for _ in range(clients)]

    def start_clock():
        run["start_ns"] = time.perf_counter_ns()
        run["until_ns"] = run["start_ns"] + int(seconds * 1e9)

    barrier = threading.Barrier(clients, action=start_clock)
    threads = [threading.Thread(target=infer_worker, args=(sock, path, barrier, run, out), daemon=True)
               for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if run.get("errors"):
        raise RuntimeError(f"infer with {clients} clients failed: {run['errors'][0]!r}")
    latencies = [value for out in results for value in out]
    elapsed_s = (time.perf_counter_ns() - run["start_ns"]) / 1e9
    return dict(summary(latencies, 1e6), clients=clients, seconds=elapsed_s,
                rate=len(latencies) / elapsed_s)


# -- output

def header() -> str:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return (f"hailo-device-manager bench  python {platform.python_version()}  "
            f"cpus {os.cpu_count()}  {now}  (simulated backend)")


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def verdict(figures: dict) -> str:
    return "MISS" if figures["p99"] is None or figures["p99"] >= PING_GOAL_US else "PASS"


def ping_row(name: str, figures: dict) -> list[str]:
    return [name, str(figures["n"]), fmt(figures["p50"]), fmt(figures["p99"]), fmt(figures["mean"]),
            "us", "-", f"p99 < {PING_GOAL_US:.0f} us", verdict(figures)]


def infer_row(figures: dict) -> list[str]:
    name = f"infer tiny.hef, {figures['clients']} client{'s' if figures['clients'] > 1 else ''}"
    return [name, str(figures["n"]), fmt(figures["p50"], 2), fmt(figures["p99"], 2),
            fmt(figures["mean"], 2), "ms", fmt(figures["rate"]), "-", "-"]


def table(rows: list[list[str]]) -> str:
    columns = ["measurement", "n", "p50", "p99", "mean", "unit", "req/s", "goal", "result"]
    rows = [columns] + rows
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    left = {0, 5, 7, 8}
    lines = ["  ".join(cell.ljust(width) if i in left else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * len(max(lines, key=len)))
    return "\n".join(lines)


def render(figures: dict) -> str:
    idle, busy = figures["ping_idle_us"], figures["ping_busy_us"]
    ratio = figures["busy_over_idle_p99"]
    rows = [ping_row("ping, idle", idle), ping_row("ping, device busy (infer)", busy),
            ["busy p99 / idle p99", "-", "-", fmt(ratio, 2), "-", "x", "-", "-", "-"],
            infer_row(figures["infer_1_client"]), infer_row(figures["infer_8_clients"])]
    return table(rows)


# -- main

def measure(sock: str, models: Path, cfg: dict) -> dict:
    idle = bench_ping_idle(sock, cfg)
    busy = bench_ping_busy(sock, models, cfg)
    ratio = busy["p99"] / idle["p99"] if busy["p99"] and idle["p99"] else None
    return {"ping_idle_us": idle, "ping_busy_us": busy, "busy_over_idle_p99": ratio,
            "busy_infer_ms": cfg["busy_ms"],
            "infer_1_client": bench_infer(sock, models, 1, cfg["infer_s"]),
            "infer_8_clients": bench_infer(sock, models, 8, cfg["infer_s"])}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (about 10 s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    return parser.parse_args(argv)


def on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds, so the daemon is stopped too


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    cfg = SETTINGS["quick" if args.quick else "default"]
    print(header(), flush=True)
    with tempfile.TemporaryDirectory(prefix="hailo-bench-") as tmp:
        models, config_path, sock = write_setup(Path(tmp))
        with running_daemon(Path(tmp), config_path, sock):
            figures = measure(sock, models, cfg)
    print(render(figures))
    if args.json:
        document = {"header": header(), "mode": "quick" if args.quick else "default",
                    "settings": cfg, "goal_ping_p99_us": PING_GOAL_US,
                    "ping_idle_result": verdict(figures["ping_idle_us"]),
                    "ping_busy_result": verdict(figures["ping_busy_us"]), **figures}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
