#!/usr/bin/env python3
"""A small HTTP service on the device manager: what a service author writes.

    POST /infer        body: an array as a .npy file; answer: the model's outputs as JSON
                       (through AsyncClient: pipelined, arrays sent as raw bytes)
    POST /infer-sync   the same through the blocking Client, run in a thread
    GET  /health       200 once the device manager answers, 503 with the reason otherwise

Run it (with `make run` in another terminal):

    PYTHONPATH=src python3 examples/embedding_service.py --model $PWD/run/models/demo.hef \\
        --socket $PWD/run/device.sock --port 8090
    python3 -c 'import numpy, sys; numpy.save(sys.stdout.buffer, numpy.zeros((224, 224, 3), "uint8"))' \\
        | curl -s --data-binary @- localhost:8090/infer

How each error of the client library becomes an HTTP answer is the point
of the example: busy and shutting_down are 503 with Retry-After, a request
that never reached the daemon is 503 (safe to retry), one lost after it
was sent or timed out is 502/504 (it may have run), a bad input is 400.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import math

import numpy as np
from aiohttp import web

from hailo_devmgr.client import (AsyncClient, Client, ConnectionLost, DeviceError, NotConnected,
                                 RequestTimeout)

RETRYABLE = {"busy", "shutting_down", "device_unavailable", "overheated"}


def error_response(exc: Exception) -> web.Response:
    if isinstance(exc, DeviceError):
        status = 503 if exc.code in RETRYABLE else 400 if exc.code in ("bad_request", "too_large") else 500
        headers = {"Retry-After": str(math.ceil(exc.retry_after_ms / 1000))} if exc.retry_after_ms else {}
        return web.json_response({"error": exc.message, "code": exc.code}, status=status, headers=headers)
    status = {NotConnected: 503, ConnectionLost: 502, RequestTimeout: 504}.get(type(exc), 500)
    return web.json_response({"error": str(exc)}, status=status)


def outputs_as_json(answer: dict) -> dict:
    result = answer["result"]
    outputs = result.get("outputs", result) if isinstance(result, dict) else {"output": result}
    return {name: np.asarray(value).tolist() for name, value in outputs.items()}


class Service:
    def __init__(self, args):
        self.model, self.input_name = args.model, args.input
        self.async_client = AsyncClient(args.socket, timeout=args.timeout, client_name="embedding_service")
        self.blocking_client = Client(args.socket, timeout=args.timeout)  # shared by the threads

    def inputs(self, array: np.ndarray) -> dict:
        return {"inputs": {self.input_name: array}}

    async def read_array(self, request: web.Request) -> np.ndarray:
        try:
            return np.load(io.BytesIO(await request.read()), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise web.HTTPBadRequest(text=f"body must be a .npy array: {exc}") from None

    async def infer(self, request: web.Request) -> web.Response:
        array = await self.read_array(request)
        try:
            answer = await self.async_client.infer(self.model, self.inputs(array), "generic")
        except (DeviceError, NotConnected, ConnectionLost, RequestTimeout) as exc:
            return error_response(exc)
        return web.json_response(outputs_as_json(answer))

    async def infer_sync(self, request: web.Request) -> web.Response:
        array = await self.read_array(request)
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(None, lambda: self.blocking_client.infer(
                self.model, self.inputs(array), "generic"))
        except (DeviceError, NotConnected, ConnectionLost, RequestTimeout) as exc:
            return error_response(exc)
        return web.json_response(outputs_as_json(answer))

    async def health(self, _request: web.Request) -> web.Response:
        try:
            await self.async_client.ping()
        except (DeviceError, NotConnected, ConnectionLost, RequestTimeout) as exc:
            return error_response(exc)
        return web.json_response({"status": "ok"})

    async def close(self, _app) -> None:
        await self.async_client.close()
        self.blocking_client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HEF path (generic model, inside the daemon's model_dirs)")
    parser.add_argument("--input", default="input_layer1", help="the model's input name")
    parser.add_argument("--socket", default=None, help="the device manager's socket")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    service = Service(args)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([web.post("/infer", service.infer), web.post("/infer-sync", service.infer_sync),
                    web.get("/health", service.health)])
    app.on_cleanup.append(service.close)
    web.run_app(app, host="127.0.0.1", port=args.port, print=lambda *_: print("listening", flush=True))


if __name__ == "__main__":
    main()
