"""The ``hailo-devmgr`` command."""
from .main import main

__all__ = ["main"]
