"""The aiohttp application of the Ollama/OpenAI port (``--listen-ollama``).

One ``AsyncClient`` for the process, without a per-answer timeout: a
generation may wait in the device queue behind others and then stream for
minutes; the daemon's watchdog bounds each device call, and a client that
leaves cancels its generation. The status port (app.py) keeps its own client
with its short timeout.
"""
from __future__ import annotations

from aiohttp import web

from ..client import AsyncClient
from . import ollama, openai
from .catalog import Catalog
from .gateway import Gateway

# Base64 images in a chat: a few MB each (the daemon's own limit is 64 MiB a message).
MAX_BODY_BYTES = 64 * 1024 * 1024


def create_gateway_app(device_socket: str, catalog_path: str) -> web.Application:
    app = web.Application(middlewares=[openai.openai_errors, ollama.ollama_errors], client_max_size=MAX_BODY_BYTES)
    client = AsyncClient(device_socket, timeout=None, client_name="hailo-devmgr-http gateway")
    app[ollama.GATEWAY_KEY] = Gateway(client, Catalog(catalog_path))
    ollama.add_routes(app)
    openai.add_routes(app)

    async def close_client(app: web.Application) -> None:
        await app[ollama.GATEWAY_KEY].client.close()
    app.on_cleanup.append(close_client)
    return app
