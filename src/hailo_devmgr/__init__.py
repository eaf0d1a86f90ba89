"""hailo-device-manager: one daemon owns the Hailo accelerator and shares it.

Services use :mod:`hailo_devmgr.client`; the daemon lives in
:mod:`hailo_devmgr.daemon`.
"""
from ._version import __version__

__all__ = ["__version__"]
