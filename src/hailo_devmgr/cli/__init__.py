"""The ``hailo-devmgr`` command."""
from .command import main

__all__ = ["main"]
