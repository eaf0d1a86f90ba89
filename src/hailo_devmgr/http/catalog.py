"""The gateway's model catalog: Ollama-style names to model files on the device.

Two sources, merged (the catalog file wins on a name both have):

- ``/etc/hailo/models.yaml`` (``--catalog``), a conffile::

      models:
        qwen2.5-instruct:1.5b:
          path: /usr/share/hailo-models/Qwen2.5-1.5B-Instruct.hef
          type: llm                  # llm or vlm
          options: {temperature: 0.7, num_predict: 512}   # defaults, Ollama names
          keep_alive: 10m            # idle time before the daemon unloads it
        qwen2-vl:2b:
          path: /usr/share/hailo-models/Qwen2-VL-2B-Instruct.hef
          type: vlm
          frame_size: [336, 336]     # the model's input frame (height, width)
      hailo_ollama_data: /var/lib/hailo-ollama   # null: do not list its models

- the models Hailo's ``hailo-ollama`` has pulled, read-only: its data folder
  holds ``models/manifests/<model>/<tag>/manifest.json`` (JSON with
  ``hef_h10h``, the HEF's file name, ``generation_params`` and ``details``)
  and the pulled HEF in ``models/blob/<hef_h10h>`` (hailo_model_zoo_genai,
  ``src/library/model/simple_store.cpp`` and ``blob_resource.cpp``). A
  manifest whose blob is not there (not pulled) is left out. They are LLMs.

A name without a tag answers to ``:latest`` and the other way round. The
file is read again when its modification time changes, so an edit needs no
restart; a broken file keeps the last good catalog and is logged.
No I/O but reading these files; nothing here knows HTTP.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

DEFAULT_CATALOG = "/etc/hailo/models.yaml"
DEFAULT_HAILO_OLLAMA_DATA = "/var/lib/hailo-ollama"
# The catalog's type -> the daemon's model type (docs/protocol.md section 9).
MODEL_TYPES = {"llm": "llm", "vlm": "vlm_chat"}
# The public Qwen2-VL HEF's frame (handlers/vlm.py); the daemon does not say it before a request.
ENTRY_KEYS = {"path", "type", "options", "keep_alive", "frame_size", "description"}


class CatalogError(ValueError):
    """The catalog file is wrong; the message names the key."""


@dataclass(frozen=True)
class Model:
    name: str                       # "qwen2.5-instruct:1.5b", always with a tag
    path: str                       # the HEF as the daemon opens it
    kind: str                       # "llm" or "vlm"
    options: dict = field(default_factory=dict)   # Ollama option names
    keep_alive: object = None       # as the catalog says it (seconds or "5m"), None: the daemon's
    frame_size: tuple | None = None   # (height, width); None: what the model says when loaded
    source: str = "catalog"         # or "hailo-ollama"
    details: dict = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return MODEL_TYPES[self.kind]

    def file_facts(self) -> tuple[int, float]:
        """(size in bytes, modification time); (0, 0.0) when the file cannot be read."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return 0, 0.0
        return stat.st_size, stat.st_mtime


def full_name(name: str) -> str:
    """``name`` with its tag (``:latest`` when it has none)."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _entry(name: str, value, where: str) -> Model:
    if not isinstance(value, dict):
        raise CatalogError(f"{where}: want a mapping with path and type, got {type(value).__name__}")
    unknown = set(value) - ENTRY_KEYS
    if unknown:
        raise CatalogError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                           f"(known: {', '.join(sorted(ENTRY_KEYS))})")
    path, kind = value.get("path"), value.get("type")
    if not isinstance(path, str) or not path.startswith("/"):
        raise CatalogError(f"{where}.path: want an absolute path, got {path!r}")
    if kind not in MODEL_TYPES:
        raise CatalogError(f"{where}.type: want one of {', '.join(MODEL_TYPES)}, got {kind!r}")
    options = value.get("options") or {}
    if not isinstance(options, dict):
        raise CatalogError(f"{where}.options: want a mapping of Ollama options, got {type(options).__name__}")
    frame = value.get("frame_size")
    if frame is not None and (not isinstance(frame, list) or len(frame) != 2 or not all(
            isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 4096 for size in frame)):
        raise CatalogError(f"{where}.frame_size: want [height, width] in pixels, got {frame!r}")
    keep_alive = value.get("keep_alive")
    if keep_alive is not None and (isinstance(keep_alive, bool) or not isinstance(keep_alive, (int, float, str))):
        raise CatalogError(f"{where}.keep_alive: want seconds or a duration like \"10m\", got {keep_alive!r}")
    details = {"description": value["description"]} if isinstance(value.get("description"), str) else {}
    return Model(name=full_name(str(name)), path=path, kind=kind, options=dict(options), keep_alive=keep_alive,
                 frame_size=tuple(frame) if frame else None, details=details)


def parse_catalog(text: str, where: str = "models.yaml") -> tuple[dict[str, Model], str | None]:
    """(models by full name, hailo-ollama's data folder or None) from the file's text."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{where}: not YAML: {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise CatalogError(f"{where}: want a mapping with 'models', got {type(data).__name__}")
    unknown = set(data) - {"models", "hailo_ollama_data"}
    if unknown:
        raise CatalogError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    entries = data.get("models") or {}
    if not isinstance(entries, dict):
        raise CatalogError(f"{where}: models: want a mapping of names, got {type(entries).__name__}")
    models = {}
    for name, value in entries.items():
        model = _entry(name, value, f"{where}: models.{name}")
        models[model.name] = model
    data_dir = data.get("hailo_ollama_data", DEFAULT_HAILO_OLLAMA_DATA)
    if data_dir is not None and not isinstance(data_dir, str):
        raise CatalogError(f"{where}: hailo_ollama_data: want a folder or null, got {data_dir!r}")
    return models, data_dir


# hailo-ollama's generation_params -> Ollama option names (the manifest's defaults).
_MANIFEST_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                     "frequency_penalty": "repeat_penalty", "stop_tokens": "stop"}


def hailo_ollama_models(data_dir: str) -> dict[str, Model]:
    """The models hailo-ollama has pulled under ``data_dir`` (its manifests whose HEF is in the blob folder)."""
    manifests = Path(data_dir) / "models" / "manifests"
    blobs = Path(data_dir) / "models" / "blob"
    models: dict[str, Model] = {}
    try:
        files = sorted(path for path in manifests.rglob("*") if path.is_file())
    except OSError:
        return models
    for path in files:
        name = f"{path.parent.parent.name}:{path.parent.name}"
        try:
            manifest = json.loads(path.read_text())
            hef = manifest["hef_h10h"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("hailo-ollama manifest %s skipped: %s", path, exc)
            continue
        blob = blobs / str(hef)
        try:
            pulled = "/" not in str(hef) and blob.is_file()
        except OSError:    # a blob this process may not look at: the daemon may still open it
            pulled = os.path.lexists(blob)
        if not pulled:
            continue   # listed by hailo-ollama but not pulled
        params = manifest.get("generation_params") or {}
        options = {ours: params[theirs] for theirs, ours in _MANIFEST_OPTIONS.items()
                   if params.get(theirs) is not None} if isinstance(params, dict) else {}
        details = manifest.get("details") if isinstance(manifest.get("details"), dict) else {}
        models[name] = Model(name=name, path=str(blob), kind="llm", options=options, source="hailo-ollama",
                             details=details)
    return models


class Catalog:
    """The merged catalog, read again when the file changes."""

    def __init__(self, path: str = DEFAULT_CATALOG):
        self.path = path
        self._stamp: tuple | None = None
        self._models: dict[str, Model] = {}
        self._data_dir: str | None = DEFAULT_HAILO_OLLAMA_DATA
        self.error: str | None = None     # why the file in use is not the one on disk

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and self._stamp is not None:
            return
        try:
            text = Path(self.path).read_text() if stamp is not None else ""
            self._models, self._data_dir = parse_catalog(text, self.path)
            self.error = None
        except (CatalogError, OSError) as exc:
            self.error = str(exc)
            log.error("model catalog not (re)read, keeping the last good one: %s", exc)
        self._stamp = stamp

    def models(self) -> dict[str, Model]:
        """Every model by full name (hailo-ollama's first, the catalog's over them)."""
        self._refresh()
        pulled = hailo_ollama_models(self._data_dir) if self._data_dir else {}
        return {**pulled, **self._models}

    def find(self, name) -> Model | None:
        if not isinstance(name, str) or not name:
            return None
        return self.models().get(full_name(name.strip()))
