"""The version: debian/changelog is its one source.

setup.py takes it from there into the package metadata; a checkout
(``make run``, the tests) reads the changelog beside the sources, an
installed package its metadata. So an upgrade to 0.1.1 reports 0.1.1.

The metadata file is read here, not through importlib.metadata: that
brings email, zipfile, csv, bz2 and lzma, about 1.5 MiB of RSS in a daemon
that idles at about 42 MiB, for one line of text (the commands in
/usr/bin avoid it too: debian/lean-entry-scripts).
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


def from_metadata(text: str) -> str | None:
    """The ``Version`` field of core metadata (PKG-INFO, METADATA): RFC 822
    style headers, ended by the first empty line (a line that starts with
    a space continues the one before). None when it has none."""
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line:
            break
        name, colon, value = line.partition(":")
        if colon and line[0] not in " \t" and name.strip().lower() == "version":
            return value.strip() or None
    return None


def installed_metadata(site: Path) -> Path | None:
    """The metadata file installed beside the package in ``site``, if there
    is exactly one: ``hailo_devmgr-<version>.egg-info/PKG-INFO`` from
    Debian's build (``setup.py install``), ``.dist-info/METADATA`` from pip."""
    found = [*site.glob("hailo_devmgr-*.egg-info/PKG-INFO"), *site.glob("hailo_devmgr-*.dist-info/METADATA")]
    return found[0] if len(found) == 1 else None


def find(changelog: Path, site: Path) -> str:
    """From ``changelog`` when it exists (a checkout), else from the
    metadata installed in ``site`` (the folder that holds the package)."""
    if changelog.is_file():
        return from_changelog(changelog.read_text(encoding="utf-8"))
    installed = installed_metadata(site)
    try:
        version = from_metadata(installed.read_text(encoding="utf-8")) if installed else None
    except (OSError, UnicodeDecodeError):
        version = None   # unreadable here: importlib.metadata says what it can
    if version is not None:
        return version
    # Only for an unusual install (several copies of the metadata, an egg):
    # importlib.metadata finds it wherever it is, at the price above.
    from importlib import metadata
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


__version__ = find(CHANGELOG, Path(__file__).resolve().parents[1])
