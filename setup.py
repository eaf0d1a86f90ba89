"""Packaging for hailo-device-manager (src layout).

The canonical Debian package is built from debian/; this file also serves
pybuild there and stdeb for the plain client-library .deb.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version():
    """debian/changelog's version (the one source); an sdist carries it in PKG-INFO."""
    changelog, pkg_info = HERE / "debian/changelog", HERE / "PKG-INFO"
    namespace = {"__file__": str(HERE / "src/hailo_devmgr/_version.py")}
    exec((HERE / "src/hailo_devmgr/_version.py").read_text(), namespace)
    if changelog.is_file():
        return namespace["from_changelog"](changelog.read_text(encoding="utf-8"))
    version = namespace["from_metadata"](pkg_info.read_text(encoding="utf-8")) if pkg_info.is_file() else None
    if version is None:
        raise SystemExit("setup.py: no debian/changelog (nor PKG-INFO) to take the version from")
    return version


setup(
    name="hailo-devmgr",
    version=read_version(),
    description="Shares one Hailo AI accelerator among the services of a host",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    maintainer="hailo-device-manager developers",
    maintainer_email="hailo-devmgr@lists.example.org",
    url="https://github.com/hailo-devmgr/hailo-device-manager",
    python_requires=">=3.11",
    package_dir={"": "src"},
    packages=find_packages("src"),
    # The recorded HailoRT API surfaces the simulated backend follows.
    package_data={"hailo_devmgr.daemon.backends": ["hailort_api/*.yaml"]},
    # The client library's needs only (python3-hailo-devmgr's Depends come
    # from here); the daemon's python3-systemd is in debian/control.
    install_requires=["numpy"],
    extras_require={"daemon": ["systemd-python", "PyYAML"]},
    entry_points={
        "console_scripts": [
            "hailo-device-manager = hailo_devmgr.daemon.main:main",
            "hailo-devmgr = hailo_devmgr.cli:main",
            "hailo-devmgr-http = hailo_devmgr.http.__main__:main",
            # Package hailo-ollama-service (Hailo's hailo-ollama as a managed service).
            "hailo-ollama-config = hailo_devmgr.ollama_service:main",
        ],
    },
)
