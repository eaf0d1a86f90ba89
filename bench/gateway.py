#!/usr/bin/python3
"""Benchmark of the Ollama/OpenAI gateway on the simulated backend (issue 17).

Starts the daemon (simulated LLM, TOKEN_MS a token) and ``hailo-devmgr-http
--listen-ollama`` as real processes, then measures:

- per streamed token: when each piece reaches an HTTP client reading
  ``/api/chat`` NDJSON, against when the same piece of the same (deterministic)
  generation reaches a client of the device socket (AsyncClient.generate),
  both counted from the moment the request was sent. The difference, token
  by token, is what the gateway adds between the device yielding a token and
  the HTTP client reading it: p50 and p99;
- time to first token, through the gateway and directly: the overhead;
- tokens/s of four chats at once through the gateway, against one alone
  (the device runs one generation at a time: the goal is within 10 %).

    make bench       # or: PYTHONPATH=src python3 bench/gateway.py [--json FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from hailo_devmgr.client import AsyncClient, NotConnected  # noqa: E402

TOKEN_MS = 10
TOKENS = 60
ROUNDS = 8
PROMPT = "go on"          # raw: the simulated model never says its end token


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def start(folder: Path) -> tuple[list[subprocess.Popen], str, str, str]:
    models = folder / "models"
    models.mkdir()
    (models / "llm.hef").write_text("context_capacity: 8192\n")
    socket_path = str(folder / "device.sock")
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "backend": "simulated", "socket_path": socket_path, "model_dirs": [str(models)], "log_level": "warning",
        "simulated": {"load_ms": 5, "infer_ms": 1, "token_ms": TOKEN_MS, "lock_path": str(folder / "lock")}}))
    (folder / "models.yaml").write_text(yaml.safe_dump(
        {"models": {"bench": {"path": str(models / "llm.hef"), "type": "llm"}}, "hailo_ollama_data": None}))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    daemon = subprocess.Popen([sys.executable, "-m", "hailo_devmgr", "--config", str(folder / "config.yaml")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    http = subprocess.Popen([sys.executable, "-m", "hailo_devmgr.http", "--device-socket", socket_path,
                             "--listen-ollama", f"127.0.0.1:{port}", "--catalog", str(folder / "models.yaml")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [http, daemon], socket_path, f"http://127.0.0.1:{port}", str(models / "llm.hef")


async def wait_up(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            try:
                async with session.get(base + "/api/version") as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("the gateway did not start")


async def wait_for_daemon(socket_path: str) -> None:
    """The gateway may answer before the daemon's socket is there (on a busy machine)."""
    for _ in range(400):
        try:
            async with AsyncClient(socket_path) as client:
                await client.request("ping")
                return
        except NotConnected:
            await asyncio.sleep(0.05)
    raise RuntimeError("the daemon did not start")


async def direct(client: AsyncClient, path: str) -> list[float]:
    """Arrival times (s after sending) of each piece, on the device socket."""
    sent = time.perf_counter()
    times = []
    async for _ in client.generate(path, {"prompt": PROMPT, "max_generated_tokens": TOKENS}, "llm",
                                   priority="interactive"):
        times.append(time.perf_counter() - sent)
    return times


async def through_gateway(session: aiohttp.ClientSession, base: str, tokens: int = TOKENS) -> tuple[list[float], int]:
    """Arrival times of each NDJSON piece, and the final eval_count."""
    body = {"model": "bench", "prompt": PROMPT, "raw": True, "options": {"num_predict": tokens}}
    sent = time.perf_counter()
    times, count = [], 0
    async with session.post(base + "/api/generate", json=body) as answer:
        async for line in answer.content:
            message = json.loads(line)
            if message.get("done"):
                count = message["eval_count"]
            elif message.get("response"):
                times.append(time.perf_counter() - sent)
    return times, count


async def measure(base: str, socket_path: str, path: str) -> dict:
    await wait_up(base)
    await wait_for_daemon(socket_path)
    async with AsyncClient(socket_path) as client, aiohttp.ClientSession() as session:
        await client.load_model(path, "llm", keep_alive=-1)
        await direct(client, path)              # warm-up, both paths
        await through_gateway(session, base)
        overheads, first_direct, first_gateway = [], [], []
        for _ in range(ROUNDS):
            ours, theirs = await direct(client, path), (await through_gateway(session, base))[0]
            if len(ours) == len(theirs):        # one piece per token: compare piece by piece
                overheads += [(gateway - device) * 1000 for gateway, device in zip(theirs, ours)]
            first_direct.append(ours[0] * 1000)
            first_gateway.append(theirs[0] * 1000)
        started = time.perf_counter()
        _, alone = await through_gateway(session, base, 100)
        alone_rate = alone / (time.perf_counter() - started)
        started = time.perf_counter()
        results = await asyncio.gather(*(through_gateway(session, base, 100) for _ in range(4)))
        four_rate = sum(count for _, count in results) / (time.perf_counter() - started)
    return {"token_ms": TOKEN_MS, "tokens_compared": len(overheads),
            "per_token_overhead_ms_p50": percentile(overheads, 0.5) if overheads else None,
            "per_token_overhead_ms_p99": percentile(overheads, 0.99) if overheads else None,
            "ttft_direct_ms_p50": percentile(first_direct, 0.5), "ttft_gateway_ms_p50": percentile(first_gateway, 0.5),
            "ttft_overhead_ms_p50": percentile(first_gateway, 0.5) - percentile(first_direct, 0.5),
            "one_chat_tokens_per_s": alone_rate, "four_chats_tokens_per_s": four_rate,
            "four_vs_one": four_rate / alone_rate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hailo-bench-gateway-"))
    processes, socket_path, base, path = start(folder)
    try:
        figures = asyncio.run(measure(base, socket_path, path))
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(folder, ignore_errors=True)
    within = abs(1 - figures["four_vs_one"]) <= 0.10
    print(f"gateway (simulated LLM, {TOKEN_MS} ms a token)")
    if figures["tokens_compared"]:
        print(f"  per streamed token, device yield -> HTTP client read: p50 {figures['per_token_overhead_ms_p50']:.2f} ms"
              f"  p99 {figures['per_token_overhead_ms_p99']:.2f} ms  ({figures['tokens_compared']} tokens)")
    else:
        print("  per streamed token: not compared (pieces were joined differently on the two paths)")
    print(f"  time to first token: direct {figures['ttft_direct_ms_p50']:.1f} ms, through the gateway "
          f"{figures['ttft_gateway_ms_p50']:.1f} ms: overhead {figures['ttft_overhead_ms_p50']:.1f} ms (p50)")
    print(f"  tokens/s: one chat {figures['one_chat_tokens_per_s']:.1f}, four at once "
          f"{figures['four_chats_tokens_per_s']:.1f} in total ({figures['four_vs_one']:.0%} of one alone) "
          f"{'PASS' if within else 'MISS'} (goal: within 10 %)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
