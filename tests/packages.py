"""Building the Debian packages for the packaging and end-to-end tests."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
PACKAGES = ("hailo-device-manager", "python3-hailo-devmgr")
# Built from the same source, installed on its own (it Depends on hailo-device-manager).
OLLAMA_PACKAGE = "hailo-ollama-service"
OLD_VERSION = "0.0.9"


def run(*argv, check=True, env=None, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, env=env or SYSTEM_ENV, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def build(tree: Path, out: Path) -> dict[str, Path]:
    """`make deb` for ``tree`` into ``out``; the .deb files by package name."""
    run("make", "-C", str(tree), "deb", f"DEB_DIR={out}", env={**SYSTEM_ENV, "HOME": str(out)}, timeout=900)
    debs = {path.name.split("_")[0]: path for path in out.glob("*.deb")}
    assert set(debs) == {*PACKAGES, OLLAMA_PACKAGE}, debs
    return debs


def build_older(tree: Path, out: Path) -> dict[str, Path]:
    """The project as it is, built with a lower version number (to upgrade from)."""
    shutil.copytree(ROOT, tree, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("build", "run", ".git", "__pycache__"))
    changelog = tree / "debian" / "changelog"
    first, rest = changelog.read_text().split("\n", 1)
    package, _version, tail = first.split(" ", 2)
    changelog.write_text(f"{package} ({OLD_VERSION}) {tail}\n{rest}")
    return build(tree, out)
