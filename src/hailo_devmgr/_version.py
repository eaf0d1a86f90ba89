"""The version: debian/changelog is its one source.

setup.py takes it from there into the package metadata; a checkout
(``make run``, the tests) reads the changelog beside the sources, an
installed package its metadata. So an upgrade to 0.1.1 reports 0.1.1.
"""
from __future__ import annotations

import re
from pathlib import Path

DISTRIBUTION = "hailo-devmgr"
CHANGELOG = Path(__file__).resolve().parents[2] / "debian" / "changelog"


def from_changelog(text: str) -> str:
    """The upstream version of the newest entry: no epoch, no Debian revision."""
    match = re.match(r"\S+ \((?:\d+:)?([^)\s]+?)(?:-[^-)\s]+)?\)", text)
    if not match:
        raise ValueError("debian/changelog: the first line has no (version)")
    return match.group(1)


def _find() -> str:
    if CHANGELOG.is_file():
        return from_changelog(CHANGELOG.read_text(encoding="utf-8"))
    # Only here: importlib.metadata brings email, zipfile, csv, bz2 and lzma (MiBs of RSS).
    from importlib import metadata
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


__version__ = _find()
