"""Model types: one handler module each, looked up by ``model_type``."""
from __future__ import annotations

from .base import Handler, InputLimits
from .clip import ClipHandler
from .generic import GenericHandler
from .vlm import VlmChatHandler, VlmHandler

HANDLERS: dict[str, type[Handler]] = {
    handler.model_type: handler
    for handler in (GenericHandler, ClipHandler, VlmHandler, VlmChatHandler)
}

__all__ = ["HANDLERS", "Handler", "InputLimits"]
