"""Model types: one handler module each, looked up by ``model_type``."""
from __future__ import annotations

from .base import Handler, InputLimits
from .clip import ClipHandler
from .depth import DepthHandler
from .generic import GenericHandler
from .llm import LlmHandler
from .ocr import OcrHandler
from .pose import PoseHandler
from .vlm import VlmChatHandler, VlmHandler
from .whisper import WhisperHandler

HANDLERS: dict[str, type[Handler]] = {
    handler.model_type: handler
    for handler in (GenericHandler, ClipHandler, VlmHandler, VlmChatHandler, WhisperHandler, OcrHandler,
                    DepthHandler, PoseHandler, LlmHandler)
}

__all__ = ["HANDLERS", "Handler", "InputLimits"]
