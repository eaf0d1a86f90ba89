"""Where the version comes from: debian/changelog in a checkout, the
package's own metadata file once installed (tests/test_packaging.py runs
the installed commands)."""
from __future__ import annotations

import pytest

from hailo_devmgr._version import find, from_changelog, from_metadata, installed_metadata

PKG_INFO = """Metadata-Version: 2.1
Name: hailo-devmgr
Version: 0.1.1
Summary: Shares one Hailo accelerator among services
License: MIT

Version: 9.9.9 (in the description, not a header)
"""


def test_a_changelog_comes_first_then_the_installed_metadata(tmp_path):
    changelog = tmp_path / "debian" / "changelog"
    site = tmp_path / "site"
    (site / "hailo_devmgr-0.1.1.egg-info").mkdir(parents=True)
    (site / "hailo_devmgr-0.1.1.egg-info" / "PKG-INFO").write_text(PKG_INFO, encoding="utf-8")
    assert find(changelog, site) == "0.1.1"
    changelog.parent.mkdir()
    changelog.write_text("hailo-device-manager (0.2.0) unstable; urgency=medium\n", encoding="utf-8")
    assert find(changelog, site) == "0.2.0"


@pytest.mark.parametrize("first_line, version", [
    ("hailo-device-manager (0.1.1) unstable; urgency=medium", "0.1.1"),
    ("hailo-device-manager (1:0.2.0-3) unstable; urgency=low", "0.2.0"),   # no epoch, no Debian revision
])
def test_the_changelog_gives_the_upstream_version(first_line, version):
    assert from_changelog(first_line + "\n\n  * Something.\n") == version


def test_the_metadata_gives_its_version_header_only():
    assert from_metadata(PKG_INFO) == "0.1.1"
    assert from_metadata("Name: hailo-devmgr\nversion:  2.0 \n") == "2.0"   # field names: any case
    assert from_metadata("Name: hailo-devmgr\n\nVersion: 1.0\n") is None      # past the headers
    assert from_metadata("Name: hailo-devmgr\nVersion:\n") is None
    assert from_metadata("Name: hailo-devmgr\r\nVersion: 3.0\r\n") == "3.0"          # CRLF
    assert from_metadata("Summary: a\n  Version: 9.9\nVersion: 3.1\n") == "3.1"        # a continuation is not a field


@pytest.mark.parametrize("made", [
    "hailo_devmgr-0.1.1.egg-info/PKG-INFO",     # Debian's build (setup.py install)
    "hailo_devmgr-0.1.1.dist-info/METADATA",    # pip
])
def test_an_install_is_read_from_the_metadata_beside_the_package(tmp_path, made):
    (tmp_path / "hailo_devmgr").mkdir()
    metadata = tmp_path / made
    metadata.parent.mkdir()
    metadata.write_text(PKG_INFO, encoding="utf-8")
    assert installed_metadata(tmp_path) == metadata
    assert from_metadata(metadata.read_text(encoding="utf-8")) == "0.1.1"


def test_no_metadata_or_two_copies_leave_it_to_importlib_metadata(tmp_path):
    assert installed_metadata(tmp_path) is None
    for made in ("hailo_devmgr-0.1.0.egg-info/PKG-INFO", "hailo_devmgr-0.1.1.egg-info/PKG-INFO"):
        (tmp_path / made).parent.mkdir()
        (tmp_path / made).write_text(PKG_INFO, encoding="utf-8")
    assert installed_metadata(tmp_path) is None   # which one is current is not ours to guess
