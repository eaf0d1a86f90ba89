#!/usr/bin/python3
"""Scheduling benchmark: the fair scheduler against the core's FIFO, side by side.

Simulated backend at 50 ms per inference. Two workloads, each run once
with `scheduling.policy: fair` and once with `fifo` in the same process:

1. One greedy client process keeps 64 `batch` requests queued (pipelined on
   one v2 connection) while an `interactive` client sends one request at a
   time. Reported: the interactive client's wait (round trip minus the
   inference itself), p50/p99. Goal: fair p99 <= one in-flight operation
   + 10 ms (60 ms); FIFO waits behind ~64 operations.
2. Eight equal clients (threads, one connection each) sending back to back:
   throughput in requests/s. Goal: fair within 5 % of FIFO.

Figures inform; a missed goal prints MISS and never changes the exit status.

    make bench       # runs this after bench/run.py
    PYTHONPATH=src python3 bench/scheduling.py [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import SRC, daemon_env, running_daemon, write_setup  # noqa: E402

from hailo_devmgr.client import AsyncClient, Client, tensor  # noqa: E402

INFER_MS = 50
GREEDY_DEPTH = 64
INPUT = {"inputs": {"x": tensor(np.arange(16, dtype=np.uint8))}}
SETTINGS = {"default": {"interactive_fair": 60, "interactive_fifo": 8, "throughput_s": 6.0},
            "quick": {"interactive_fair": 20, "interactive_fifo": 4, "throughput_s": 3.0}}


def configure(config_path: Path, policy: str) -> None:
    import yaml
    config = yaml.safe_load(config_path.read_text())
    config["simulated"]["infer_ms"] = INFER_MS
    config["scheduling"] = {"policy": policy}
    config_path.write_text(yaml.safe_dump(config))


# -- the greedy client (its own process, so the scheduler sees another client)

async def greedy(sock: str, model: str) -> None:
    async with AsyncClient(sock, timeout=600) as client:
        async def keep_one_queued():
            while True:
                await client.infer(model, INPUT, "generic", priority="batch")
        await asyncio.gather(*(keep_one_queued() for _ in range(GREEDY_DEPTH)))


def start_greedy(sock: str, model: str) -> subprocess.Popen:
    code = (f"import asyncio, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import scheduling; asyncio.run(scheduling.greedy({sock!r}, {model!r}))")
    return subprocess.Popen([sys.executable, "-c", code], env=daemon_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_backlog(sock: str) -> None:
    deadline = time.monotonic() + 30
    with Client(sock, timeout=10) as client:
        while client.status()["queue_by_class"]["batch"] < GREEDY_DEPTH - 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the greedy client never filled the queue")
            time.sleep(0.05)


def interactive_waits(sock: str, model: str, count: int) -> list[float]:
    waits = []
    with Client(sock, timeout=600) as client:
        client.infer(model, INPUT, "generic", priority="interactive")  # model loaded, connection warm
        for _ in range(count):
            started = time.perf_counter()
            answer = client.infer(model, INPUT, "generic", priority="interactive")
            round_trip_ms = (time.perf_counter() - started) * 1000
            waits.append(round_trip_ms - answer["inference_time_ms"])
    return waits


def bench_priority(sock: str, model: str, count: int) -> dict:
    greedy_process = start_greedy(sock, model)
    try:
        wait_for_backlog(sock)
        waits = interactive_waits(sock, model, count)
    finally:
        greedy_process.kill()
        greedy_process.wait()
    return {"n": len(waits), "p50_ms": float(np.percentile(waits, 50)), "p99_ms": float(np.percentile(waits, 99))}


# -- eight equal clients

def bench_throughput(sock: str, model: str, seconds: float, clients: int = 8) -> dict:
    counts = [0] * clients
    stop_at = time.monotonic() + seconds

    def work(index: int) -> None:
        with Client(sock, timeout=60) as client:
            while time.monotonic() < stop_at:
                client.infer(model, INPUT, "generic")
                counts[index] += 1

    threads = [threading.Thread(target=work, args=(index,)) for index in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return {"requests": sum(counts), "req_per_s": sum(counts) / elapsed,
            "per_client_min": min(counts), "per_client_max": max(counts)}


def run_policy(policy: str, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="hailo-sched-bench-") as tmp:
        root = Path(tmp)
        models, config_path, sock = write_setup(root)
        configure(config_path, policy)
        model = str(models / "tiny.hef")
        with running_daemon(root, config_path, sock):
            count = cfg["interactive_fair"] if policy == "fair" else cfg["interactive_fifo"]
            priority = bench_priority(sock, model, count)
            throughput = bench_throughput(sock, model, cfg["throughput_s"])
    return {"priority": priority, "throughput": throughput}


def report(results: dict) -> str:
    fair, fifo = results["fair"], results["fifo"]
    goal_ms = INFER_MS + 10
    lines = [
        f"scheduling bench  python {sys.version.split()[0]}  cpus {os.cpu_count()}  "
        f"simulated {INFER_MS} ms/inference, greedy client {GREEDY_DEPTH} batch requests queued",
        f"{'measurement':<36}{'fair':>12}{'fifo':>12}{'fifo/fair':>11}  goal",
        "-" * 90,
    ]
    for key, label in (("p50_ms", "interactive wait p50 (ms)"), ("p99_ms", "interactive wait p99 (ms)")):
        a, b = fair["priority"][key], fifo["priority"][key]
        lines.append(f"{label:<36}{a:>12.1f}{b:>12.1f}{b / max(a, 1e-9):>11.1f}")
    ok = "PASS" if fair["priority"]["p99_ms"] <= goal_ms else "MISS"
    lines[-1] += f"  fair p99 <= {goal_ms} ms: {ok}"
    lines.append(f"{'interactive samples':<36}{fair['priority']['n']:>12}{fifo['priority']['n']:>12}")
    a, b = fair["throughput"]["req_per_s"], fifo["throughput"]["req_per_s"]
    ok = "PASS" if a >= 0.95 * b else "MISS"
    lines.append(f"{'8 equal clients (req/s)':<36}{a:>12.1f}{b:>12.1f}{b / a:>11.2f}  fair >= 95% of fifo: {ok}")
    spread = "{per_client_min}-{per_client_max}"
    lines.append(f"{'  requests per client (min-max)':<36}{spread.format(**fair['throughput']):>12}"
                 f"{spread.format(**fifo['throughput']):>12}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (about 20 s)")
    args = parser.parse_args(argv)
    cfg = SETTINGS["quick" if args.quick else "default"]
    results = {policy: run_policy(policy, cfg) for policy in ("fair", "fifo")}
    print(report(results))
    return 0


if __name__ == "__main__":
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    sys.exit(main())
