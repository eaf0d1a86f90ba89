"""The HailoRT Python API as Hailo's sources define it, one recorded surface per version.

The facts live as data in ``hailort_api/<version>.yaml`` (read from
hailo-ai/hailort at the release tag, each entry citing path and line;
docs/hailort-api.md explains them). The simulated backend builds its
``hailo_platform`` from this data, so it cannot offer a module, class,
method, keyword or call shape that the real version lacks, and a test checks
that every ``hailo_platform`` attribute the daemon touches is in it.

Schema of one file: ``version``, ``tag``; ``modules`` {dotted name:
{exports, ...}}; ``classes`` {name: {methods: {name: {params: [{name,
kind, default?, type?}], static?}}, properties: {name: ...},
context_manager}}; ``enums`` {name: {members: {NAME: number}}};
``statuses`` {number: name}; ``behaviours`` [{id, fact, source}];
``limits`` {name: number}.
"""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

import yaml

from ..hailort_status import version_tuple

DATA_DIR = Path(__file__).with_name("hailort_api")
_KINDS = {
    "positional_only": inspect.Parameter.POSITIONAL_ONLY,
    "positional_or_keyword": inspect.Parameter.POSITIONAL_OR_KEYWORD,
    "var_positional": inspect.Parameter.VAR_POSITIONAL,
    "keyword_only": inspect.Parameter.KEYWORD_ONLY,
    "var_keyword": inspect.Parameter.VAR_KEYWORD,
}


def recorded_versions() -> tuple[str, ...]:
    """The versions with a recorded surface, oldest first."""
    return tuple(sorted((path.stem for path in DATA_DIR.glob("*.yaml")), key=version_tuple))


class ApiSurface:
    """One version's recorded API; read-only."""

    def __init__(self, data: dict):
        self.version: str = str(data["version"])
        self.tag: str = str(data["tag"])
        self.modules: dict = data.get("modules") or {}
        self.classes: dict = data.get("classes") or {}
        self.statuses: dict = {int(number): name for number, name in (data.get("statuses") or {}).items()}
        self.exceptions: dict = data.get("exceptions") or {}
        # Numbers the sources fix, e.g. vlm_max_frames (5.1.1's server limit).
        self.limits: dict = dict(data.get("limits") or {})

    def has_module(self, name: str) -> bool:
        module = self.modules.get(name)
        return module is not None and module.get("present", True)

    def exports(self, module: str) -> frozenset[str]:
        return frozenset(self.modules.get(module, {}).get("exports") or ())

    def members(self, class_name: str) -> frozenset[str]:
        """Methods, properties and fields of a class (what ``obj.<name>`` may read)."""
        spec = self.classes.get(class_name) or {}
        names: set[str] = set()
        for section in ("methods", "properties", "fields", "members"):
            names.update((spec.get(section) or {}).keys())
        return frozenset(names)

    def method(self, class_name: str, name: str) -> dict | None:
        return ((self.classes.get(class_name) or {}).get("methods") or {}).get(name)

    def signature(self, class_name: str, name: str) -> inspect.Signature:
        """The recorded parameters of a method (without self), as Python would bind them."""
        spec = self.method(class_name, name)
        if spec is None:
            raise KeyError(f"{class_name}.{name} is not in HailoRT {self.version}")
        params = []
        for entry in spec.get("params") or []:
            default = entry.get("default", inspect.Parameter.empty)
            params.append(inspect.Parameter(entry["name"], _KINDS[entry["kind"]], default=_value(default)))
        return inspect.Signature(params)


def _value(default: Any) -> Any:
    """A recorded default: literal, or ``{expr: "..."}`` for one the source computes
    (kept as a marker: the simulation fills in its own value)."""
    if isinstance(default, dict) and "expr" in default:
        return Computed(default["expr"])
    return default


class Computed(str):
    """A default the source computes (e.g. ``Speech2TextTask.TRANSCRIBE``)."""


@functools.cache
def load(version: str) -> ApiSurface:
    path = DATA_DIR / f"{version}.yaml"
    if not path.is_file():
        raise ValueError(f"no recorded HailoRT API for version {version!r} "
                         f"(recorded: {', '.join(recorded_versions())})")
    # libyaml's loader where python3-yaml has it: the recorded surface is large,
    # and the pure-Python loader took about a second of every simulated start.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return ApiSurface(yaml.load(path.read_text(encoding="utf-8"), Loader=loader))
