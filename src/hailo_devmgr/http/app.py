"""The aiohttp application: each request asks the daemon over its socket.

One ``AsyncClient`` is kept for the process (it reconnects by itself when
the daemon restarts); a daemon that cannot be reached answers 503 with the
reason, so a status page shows why rather than hanging.
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from ..client import AsyncClient
from .prometheus import Snapshot

log = logging.getLogger(__name__)
# Below Prometheus' default scrape timeout (10 s), so a scrape gets our 503, not its own.
DAEMON_TIMEOUT_S = 8.0
CLIENT_KEY = web.AppKey("client", AsyncClient) if hasattr(web, "AppKey") else "client"


def _unavailable(exc: Exception) -> web.Response:
    reason = str(exc) or type(exc).__name__
    log.warning("device manager unavailable: %s", reason)
    return web.json_response({"error": f"device manager unavailable: {reason}", "code": "device_unavailable"},
                             status=503)


async def device_status(request: web.Request) -> web.Response:
    client: AsyncClient = request.app[CLIENT_KEY]
    try:
        answer = await client.device_status()
    except Exception as exc:  # whatever went wrong asking the daemon: say it, never a bare 500
        return _unavailable(exc)
    answer.pop("request_id", None)
    return web.json_response(answer)


async def metrics(request: web.Request) -> web.Response:
    client: AsyncClient = request.app[CLIENT_KEY]
    try:
        status, device, counters = await asyncio.gather(client.status(), client.device_status(), client.metrics())
    except Exception as exc:
        return _unavailable(exc)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot(status, device, counters.get("metrics", {})))
    # The header's charset goes in the content type as Prometheus names it.
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(device_socket: str) -> web.Application:
    app = web.Application()
    app[CLIENT_KEY] = AsyncClient(device_socket, timeout=DAEMON_TIMEOUT_S, client_name="hailo-devmgr-http")
    app.router.add_get("/v1/device/status", device_status)
    app.router.add_get("/metrics", metrics)

    async def close_client(app: web.Application) -> None:
        await app[CLIENT_KEY].close()
    app.on_cleanup.append(close_client)
    return app
