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
- transport cost: that overhead (median) minus the median overhead of
  16-byte ``infer`` requests sent the same way in the same rounds (the
  fixed cost of an ``infer`` through the daemon: worker thread, scheduler,
  device thread), i.e. what carrying the bytes costs;
- daemon CPU per request (ms): CPU time of the daemon's threads
  (/proc/<pid>/task/*/schedstat) around the large requests, divided by
  their number;

and, for a large result (a 1080x1920x3 output for a 16-byte input), the
overhead of getting it back as an attachment (what ``transport="auto"``
asks for) and in a one-shot memfd the daemon makes (``transport="shm"``),
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
FLOOR = "16 B"
SHAPES = {FLOOR: (16,), "640x640x3": (640, 640, 3), "1920x1080x3": (1080, 1920, 3)}
# name -> AsyncClient settings
MODES = {"base64": {"transport": "base64"},
         "attachments": {"transport": "attachments"},
         "shm one-shot": {"transport": "shm", "shm_buffers": False},
         "shm buffers": {"transport": "shm", "shm_buffers": True},
         "shm shared array": {"transport": "shm"}}
# Large results: a 16-byte input, this uint8 output, back as an attachment ("auto")
# or in a one-shot memfd the daemon makes (a client that asks for "shm" results).
RESULT_SHAPE = (1080, 1920, 3)
RESULT_MODES = {"attachment (auto)": {"transport": "auto"}, "shm one-shot (transport=\"shm\")": {"transport": "shm"}}
# Modes whose input is made in shared memory by the application (AsyncClient.shared_array).
IN_PLACE = {"shm shared array"}
OUTPUT_BYTES = 1000 * 4
# Requests per transport: rounds x per_round, the transports taking turns each round.
SETTINGS = {"default": {"warmup": 5, "rounds": 30, "per_round": 5},
            "quick": {"warmup": 3, "rounds": 8, "per_round": 3}}


def hef(shape, output=(1000,), output_format="FLOAT32") -> str:
    return yaml.safe_dump({"inputs": [{"name": "image", "shape": list(shape), "format": "UINT8"}],
                           "outputs": [{"name": "scores", "shape": list(output), "format": output_format}],
                           "memory_mb": 1})


def setup(root: Path) -> tuple[Path, Path, str]:
    models = root / "models"
    models.mkdir()
    for name, shape in SHAPES.items():
        (models / f"{name}.hef").write_text(hef(shape))
    (models / "result.hef").write_text(hef(SHAPES[FLOOR], RESULT_SHAPE, "UINT8"))
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


async def bench_input(sock: str, models: Path, name: str, pid: int, cfg: dict) -> dict:
    """Every transport and the raw socketpair for one input size.

    In each round every transport sends a few 16-byte requests (its floor)
    and then as many large ones, and the raw socketpair takes its turn: a
    slower moment of this shared machine weighs on all of them, and on both
    sides of each difference, alike."""
    images = {size: np.random.default_rng(0).integers(0, 256, size=SHAPES[size], dtype=np.uint8)
              for size in (FLOOR, name)}
    paths = {size: str(models / f"{size}.hef") for size in images}
    clients = {mode: await AsyncClient(sock, timeout=120, **settings).connect() for mode, settings in MODES.items()}
    requests = {(mode, size): {"inputs": {"image": image}} for mode in MODES for size, image in images.items()}
    for mode in IN_PLACE:
        for size, image in images.items():
            shared = await clients[mode].shared_array(image.shape, image.dtype)
            shared[:] = image   # once: an application would decode its frames straight into it
            requests[mode, size] = {"inputs": {"image": shared}}

    async def one(mode: str, size: str) -> tuple[float, float]:
        start = time.perf_counter()
        answer = await clients[mode].infer(paths[size], requests[mode, size], model_type="generic")
        rtt = (time.perf_counter() - start) * 1000
        assert isinstance(answer["result"]["outputs"]["scores"], np.ndarray)
        return rtt, rtt - answer["inference_time_ms"]

    raw = RawPair(images[name].nbytes)
    data = memoryview(images[name]).cast("B")
    samples = {mode: {"rtt": [], "overhead": [], "floor": [], "cpu_s": 0.0} for mode in MODES}
    raw_rtts: list[float] = []
    try:
        for mode in MODES:
            for _ in range(cfg["warmup"]):
                await one(mode, FLOOR)
                await one(mode, name)
        for _ in range(cfg["warmup"]):
            raw.round_trip(data)
        order = [None, *MODES]   # None: the raw socketpair
        for round_ in range(cfg["rounds"]):
            for mode in order[round_ % len(order):] + order[:round_ % len(order)]:
                if mode is None:
                    raw_rtts += [raw.round_trip(data) for _ in range(cfg["per_round"])]
                    continue
                sample = samples[mode]
                sample["floor"] += [(await one(mode, FLOOR))[1] for _ in range(cfg["per_round"])]
                cpu_before = cpu_seconds(pid)
                for _ in range(cfg["per_round"]):
                    rtt, overhead = await one(mode, name)
                    sample["rtt"].append(rtt)
                    sample["overhead"].append(overhead)
                sample["cpu_s"] += cpu_seconds(pid) - cpu_before
    finally:
        raw.close()
        for client in clients.values():
            await client.close()
    count = cfg["rounds"] * cfg["per_round"]
    row = {"raw socket": {"rtt": stats(raw_rtts)}}
    for mode, sample in samples.items():
        row[mode] = {"rtt": stats(sample["rtt"]), "overhead": stats(sample["overhead"]),
                     "floor_overhead": stats(sample["floor"]),
                     "transport_cost_ms": float(np.median(sample["overhead"]) - np.median(sample["floor"])),
                     "daemon_cpu_ms": sample["cpu_s"] * 1000 / count}
    return row


async def bench_results(sock: str, models: Path, cfg: dict) -> dict:
    """A large result each way, taking turns in rounds: overhead (round trip
    minus inference time), median and p90."""
    image = np.zeros(SHAPES[FLOOR], np.uint8)
    path = str(models / "result.hef")
    clients = {mode: await AsyncClient(sock, timeout=120, **settings).connect()
               for mode, settings in RESULT_MODES.items()}
    overheads: dict = {mode: [] for mode in RESULT_MODES}
    try:
        for round_ in range(cfg["warmup"] + cfg["rounds"]):
            for mode, client in clients.items():
                for _ in range(cfg["per_round"]):
                    start = time.perf_counter()
                    answer = await client.infer(path, {"inputs": {"image": image}}, model_type="generic")
                    assert answer["result"]["outputs"]["scores"].shape == RESULT_SHAPE
                    if round_ >= cfg["warmup"]:
                        overheads[mode].append((time.perf_counter() - start) * 1000 - answer["inference_time_ms"])
    finally:
        for client in clients.values():
            await client.close()
    return {mode: stats(values) for mode, values in overheads.items()}


def measure(cfg: dict) -> dict:
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="hailo-bench-transport-") as folder:
        root = Path(folder)
        models, config_path, sock = setup(root)
        with running_daemon(root, config_path, sock) as process:
            for name in SHAPES:
                if name != FLOOR:
                    figures[name] = asyncio.run(bench_input(sock, models, name, process.pid, cfg))
            figures["results"] = asyncio.run(bench_results(sock, models, cfg))
    return figures


GOALS = {"attachments": 2.0, "shm buffers": 1.0, "shm shared array": 1.0}   # most x raw socket


def render(figures: dict) -> str:
    lines = ["| input | transport | round trip ms (median / p90) | overhead ms (16 B floor) | transport cost ms "
             "| x raw socket | daemon CPU ms/request | goal |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in figures.items():
        if name == "results":
            continue
        raw = row["raw socket"]["rtt"]["median"]
        lines.append(f"| {name} | raw socketpair | {raw:.3f} / {row['raw socket']['rtt']['p90']:.3f} "
                     f"| | {raw:.3f} | 1.00 | - | |")
        for mode in MODES:
            item = row[mode]
            cost = item["transport_cost_ms"]  # below zero: within the noise of the floor
            ratio = cost / raw
            goal = "" if mode not in GOALS else ("PASS" if ratio <= GOALS[mode] else "MISS")
            lines.append(f"| {name} | {mode} | {item['rtt']['median']:.3f} / {item['rtt']['p90']:.3f} "
                         f"| {item['overhead']['median']:.3f} ({item['floor_overhead']['median']:.3f}) "
                         f"| {cost:.3f} | {ratio:.2f} | {item['daemon_cpu_ms']:.2f} | {goal} |")
    shape = "x".join(str(size) for size in RESULT_SHAPE)
    lines += ["", f"Results: a {shape} uint8 output for a 16-byte input",
              "| result travels as | overhead ms (median / p90) |", "|---|---|"]
    lines += [f"| {mode} | {item['median']:.3f} / {item['p90']:.3f} |" for mode, item in figures["results"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    cfg = SETTINGS["quick" if args.quick else "default"]
    figures = measure(cfg)
    print(f"Tensor transports, simulated backend at 0 ms, {cfg['rounds'] * cfg['per_round']} requests (and as "
          f"many 16-byte ones) per transport and input, in {cfg['rounds']} interleaved rounds, one in flight "
          f"({os.cpu_count()} CPUs)")
    print(render(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
