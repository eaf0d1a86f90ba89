#!/usr/bin/python3
"""The least a one-device-thread Python daemon must do: the yardstick of
bench/small_requests.py (issue 16, "Speed").

An asyncio Unix-socket server speaking protocol v1 (4-byte big-endian
length, then a JSON object; answers framed the same way), one request at
a time per connection:

* ``ping`` and ``load_model`` are answered at once on the event loop;
* ``infer`` goes to ONE worker thread (standing in for the thread that owns
  the accelerator) and back: the thread decodes the first input tensor's
  base64 and returns it as output ``y``, with ``inference_time_ms``;
* anything else gets ``{"error": ..., "code": "unknown_action"}``.

No limits, scheduling, validation or status: it is a floor, not a daemon.

    python3 bench/reference_daemon.py --socket /tmp/ref.sock   # SIGTERM or Ctrl-C stops it
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import struct
import time
from concurrent.futures import ThreadPoolExecutor

HEADER = struct.Struct(">I")
MAX_BODY = 64 * 1024 * 1024
device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")


def frame(answer: dict) -> bytes:
    body = json.dumps(answer, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def run_inference(input_data: dict) -> dict:
    """On the device thread: the input's bytes back as output y."""
    start = time.perf_counter()
    tensor = next(iter(input_data["inputs"].values()))
    data = base64.b64decode(tensor["data_b64"])
    result = {"outputs": {"y": {"dtype": "uint8", "shape": [len(data)],
                                "data_b64": base64.b64encode(data).decode()}}}
    return {"status": "ok", "result": result,
            "inference_time_ms": round((time.perf_counter() - start) * 1000, 3)}


async def answer(request: dict) -> dict:
    action = request.get("action")
    if action == "ping":
        return {"status": "ok"}
    if action == "load_model":
        return {"status": "ok", "model_path": request.get("model_path"),
                "model_type": request.get("model_type"), "message": "Model loaded"}
    if action == "infer":
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(device, run_inference, request["input_data"])
    return {"error": f"Unknown action: {action}", "code": "unknown_action"}


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (length,) = HEADER.unpack(await reader.readexactly(4))
            if length > MAX_BODY:
                writer.write(frame({"error": "Message too large", "code": "too_large"}))
                break
            body = await reader.readexactly(length)
            try:
                request = json.loads(body)
                reply = await answer(request)
            except Exception as exc:  # bad JSON, missing fields: answer and go on
                request, reply = {}, {"error": str(exc), "code": "bad_request"}
            if isinstance(request, dict) and "request_id" in request:
                reply["request_id"] = request["request_id"]
            writer.write(frame(reply))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    server = await asyncio.start_unix_server(serve_connection, path)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    async with server:
        await stopped.wait()
    os.unlink(path)
    device.shutdown(wait=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    asyncio.run(main(parser.parse_args().socket))
