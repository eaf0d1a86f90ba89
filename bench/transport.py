#!/usr/bin/python3
"""Benchmark of the tensor transports: v1 base64, v2 attachments, v2 shared memory.

Starts the daemon (simulated backend, 0 ms inferences) with simulated HEFs:
a generic network taking one 16-byte, 640x640x3 or 1080x1920x3 uint8 input
and giving 1000 float32 scores, and measures one ``infer`` at a time
through ``AsyncClient`` with each transport: base64 (v1 tensors in the
JSON), attachments, "shm one-shot" (a new sealed memfd per request),
"shm buffers" (registered once per connection; the client copies each
input into one) and "shm shared array" (the input is made in a registered
buffer by the application, ``AsyncClient.shared_array``, and sent with no
copy at all):

- round trip (ms, median and p90 over the requests);
- overhead: the round trip minus ``inference_time_ms`` (the simulated
  device's own time: a CRC of the input, the same for every transport);
- transport cost: that overhead minus the same transport's overhead for the
  16-byte input (the fixed cost of an ``infer`` through the daemon: worker
  thread, scheduler, device thread), i.e. what carrying the bytes costs;
- daemon CPU per request (ms): CPU time of the daemon's threads
  (/proc/<pid>/task/*/schedstat) around each transport's requests, divided
  by their number;

next to "raw socket": the same input bytes sent over a Unix socketpair
inside this process (a thread receives them into a preallocated buffer and
answers with 4 000 bytes, the size of the scores), round trip in ms. The
transports and the raw socket take turns in rounds, so a busy moment of
the machine weighs on all of them alike.

Goal: attachments' transport cost within 2x of the raw socket, shared
memory's (registered buffers) below it. A missed goal is reported (MISS)
but never changes the exit status.

    make bench        # or: PYTHONPATH=src /usr/bin/python3 bench/transport.py [--quick] [--json FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import running_daemon  # noqa: E402  (also puts src/ on sys.path)

from hailo_devmgr.client import AsyncClient  # noqa: E402

# "16 B" is the floor: what one infer costs with (almost) nothing to carry.
SHAPES = {"16 B": (16,), "640x640x3": (640, 640, 3), "1920x1080x3": (1080, 1920, 3)}
# name -> AsyncClient settings
MODES = {"base64": {"transport": "base64"},
         "attachments": {"transport": "attachments"},
         "shm one-shot": {"transport": "shm", "shm_buffers": False},
         "shm buffers": {"transport": "shm", "shm_buffers": True},
         "shm shared array": {"transport": "shm"}}
# Modes whose input is made in shared memory by the application (AsyncClient.shared_array).
IN_PLACE = {"shm shared array"}
OUTPUT_BYTES = 1000 * 4
# Requests per transport: rounds x per_round, the transports taking turns each round.
SETTINGS = {"default": {"warmup": 5, "rounds": 30, "per_round": 5},
            "quick": {"warmup": 3, "rounds": 8, "per_round": 3}}


def hef(shape) -> str:
    return yaml.safe_dump({"inputs": [{"name": "image", "shape": list(shape), "format": "UINT8"}],
                           "outputs": [{"name": "scores", "shape": [1000], "format": "FLOAT32"}],
                           "memory_mb": 1})


def setup(root: Path) -> tuple[Path, Path, str]:
    models = root / "models"
    models.mkdir()
    for name, shape in SHAPES.items():
        (models / f"{name}.hef").write_text(hef(shape))
    sock = str(root / "device.sock")
    config = {"backend": "simulated", "socket_path": sock, "model_dirs": [str(models)], "log_level": "warning",
              "max_message_bytes": 64 * 1024 * 1024, "max_pending_bytes": 512 * 1024 * 1024,
              "simulated": {"load_ms": 0, "infer_ms": 0, "lock_path": str(root / "device.lock")}}
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return models, config_path, sock


def cpu_seconds(pid: int) -> float:
    """CPU time of all the daemon's threads: nanoseconds from schedstat (utime
    and stime count in 10 ms ticks, too coarse for a millisecond request)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total / 1e9


def stats(values: list[float]) -> dict:
    array = np.asarray(values)
    return {"median": float(np.median(array)), "p90": float(np.percentile(array, 90))}


class RawPair:
    """The same bytes over a socketpair in this process: a thread receives them
    into a preallocated buffer and answers with OUTPUT_BYTES."""

    def __init__(self, size: int):
        self.size = size
        self.left, self.right = socket.socketpair()
        self.answer = bytearray(OUTPUT_BYTES)
        self.thread = threading.Thread(target=self._echo, daemon=True)
        self.thread.start()

    def _echo(self) -> None:
        view = memoryview(bytearray(self.size))
        reply = bytes(OUTPUT_BYTES)
        while True:
            received = 0
            while received < self.size:
                count = self.right.recv_into(view[received:])
                if not count:
                    return
                received += count
            self.right.sendall(reply)

    def round_trip(self, data: memoryview) -> float:
        start = time.perf_counter()
        self.left.sendall(data)
        received = 0
        while received < OUTPUT_BYTES:
            received += self.left.recv_into(memoryview(self.answer)[received:])
        return (time.perf_counter() - start) * 1000

    def close(self) -> None:
        self.left.close()
        self.thread.join(5)
        self.right.close()


async def bench_input(sock: str, model: str, image: np.ndarray, pid: int, cfg: dict) -> dict:
    """Every transport and the raw socketpair, in rounds that take turns, so
    that a slower moment of this shared machine weighs on all of them alike."""
    clients = {mode: await AsyncClient(sock, timeout=120, **settings).connect() for mode, settings in MODES.items()}
    requests = {mode: {"inputs": {"image": image}} for mode in MODES}
    for mode in IN_PLACE:
        shared = await clients[mode].shared_array(image.shape, image.dtype)
        shared[:] = image   # once: an application would decode its frames straight into it
        requests[mode] = {"inputs": {"image": shared}}
    raw = RawPair(image.nbytes)
    data = memoryview(image).cast("B")
    samples = {name: {"rtt": [], "overhead": [], "cpu_s": 0.0} for name in ["raw socket", *MODES]}
    try:
        for mode, client in clients.items():
            for _ in range(cfg["warmup"]):
                await client.infer(model, requests[mode], model_type="generic")
        for _ in range(cfg["warmup"]):
            raw.round_trip(data)
        order = ["raw socket", *MODES]
        for round_ in range(cfg["rounds"]):
            for name in order[round_ % len(order):] + order[:round_ % len(order)]:
                sample = samples[name]
                if name == "raw socket":
                    sample["rtt"] += [raw.round_trip(data) for _ in range(cfg["per_round"])]
                    continue
                cpu_before = cpu_seconds(pid)
                for _ in range(cfg["per_round"]):
                    start = time.perf_counter()
                    answer = await clients[name].infer(model, requests[name], model_type="generic")
                    rtt = (time.perf_counter() - start) * 1000
                    assert isinstance(answer["result"]["outputs"]["scores"], np.ndarray)
                    sample["rtt"].append(rtt)
                    sample["overhead"].append(rtt - answer["inference_time_ms"])
                sample["cpu_s"] += cpu_seconds(pid) - cpu_before
    finally:
        raw.close()
        for client in clients.values():
            await client.close()
    count = cfg["rounds"] * cfg["per_round"]
    row = {"raw socket": {"rtt": stats(samples["raw socket"]["rtt"])}}
    for mode in MODES:
        row[mode] = {"rtt": stats(samples[mode]["rtt"]), "overhead": stats(samples[mode]["overhead"]),
                     "daemon_cpu_ms": samples[mode]["cpu_s"] * 1000 / count}
    return row


def measure(cfg: dict) -> dict:
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="hailo-bench-transport-") as folder:
        root = Path(folder)
        models, config_path, sock = setup(root)
        with running_daemon(root, config_path, sock) as process:
            for name, shape in SHAPES.items():
                image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
                model = str(models / f"{name}.hef")
                figures[name] = asyncio.run(bench_input(sock, model, image, process.pid, cfg))
    return figures


def render(figures: dict) -> str:
    lines = ["| input | transport | round trip ms (median / p90) | overhead ms | transport cost ms "
             "| x raw socket | daemon CPU ms/request | goal |",
             "|---|---|---|---|---|---|---|---|"]
    floor = figures.get("16 B", {})
    for name, row in figures.items():
        raw = row["raw socket"]["rtt"]["median"]
        lines.append(f"| {name} | raw socketpair | {raw:.3f} / {row['raw socket']['rtt']['p90']:.3f} "
                     f"| | {raw:.3f} | 1.00 | - | |")
        for mode in MODES:
            item = row[mode]
            overhead = item["overhead"]["median"]
            # Below zero: the bytes cost less than the noise of the 16-byte floor.
            cost = overhead - floor[mode]["overhead"]["median"] if mode in floor else overhead
            item["transport_cost_ms"] = cost
            ratio = cost / raw
            goal = "" if name == "16 B" else {"attachments": "PASS" if ratio <= 2 else "MISS",
                                              "shm buffers": "PASS" if ratio < 1 else "MISS",
                                              "shm shared array": "PASS" if ratio < 1 else "MISS"}.get(mode, "")
            lines.append(f"| {name} | {mode} | {item['rtt']['median']:.3f} / {item['rtt']['p90']:.3f} "
                         f"| {overhead:.3f} | {cost:.3f} | {ratio:.2f} | {item['daemon_cpu_ms']:.2f} | {goal} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    cfg = SETTINGS["quick" if args.quick else "default"]
    figures = measure(cfg)
    print(f"Tensor transports, simulated backend at 0 ms, {cfg['rounds'] * cfg['per_round']} requests each "
          f"in {cfg['rounds']} interleaved rounds, one in flight "
          f"({os.cpu_count()} CPUs)")
    print(render(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
