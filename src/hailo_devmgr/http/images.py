"""Images from HTTP clients to the frames a VLM takes.

Ollama sends base64 (``images: ["iVBOR..."]``), OpenAI a data URL
(``data:image/png;base64,...``). Whatever the format Pillow reads (PNG,
JPEG, WebP, GIF's first frame, ...), the picture becomes RGB, is scaled to
cover the model's frame and centre-cropped to it (no distortion), and is
handed over as a uint8 height x width x 3 array: the shape the vlm handler
checks (handlers/vlm.py takes exactly the model's frame shape, it does not
resize). Decoding runs off the event loop (the caller's executor).
"""
from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

# A decompression bomb is refused before it is decoded (Pillow's own guard, made an error).
MAX_PIXELS = 50_000_000
MAX_IMAGES = 32          # the daemon's frame limit (docs/protocol.md 9.4)


class ImageError(ValueError):
    """The client's image is not one; the message says why (a 400)."""


def from_base64(text, where: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise ImageError(f"{where}: want a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: not valid base64") from None


def from_data_url(url, where: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL; no other URL is fetched."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ImageError(f"{where}: only data URLs (data:image/png;base64,...) are accepted, "
                         "the gateway fetches no remote image")
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageError(f"{where}: want a base64 data URL (data:image/...;base64,...)")
    return from_base64(payload, where)


def to_frame(data: bytes, size: tuple[int, int], where: str) -> np.ndarray:
    """The picture in ``data`` as a uint8 array of ``size`` (height, width) x 3."""
    height, width = size
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.draft("RGB", (width, height))   # JPEG: decode at a smaller scale when it can
            picture = picture.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise ImageError(f"{where}: not an image Pillow can read ({exc})") from None
    scale = max(width / picture.width, height / picture.height)
    scaled = (max(width, round(picture.width * scale)), max(height, round(picture.height * scale)))
    picture = picture.resize(scaled, Image.Resampling.BICUBIC)
    left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    picture = picture.crop((left, top, left + width, top + height))
    return np.asarray(picture, dtype=np.uint8).reshape(height, width, 3)
