"""The client library: what a service needs to use the device manager.

``Client`` (blocking) and ``AsyncClient`` (asyncio), their errors, and
``tensor()``. Ships in python3-hailo-devmgr with ``hailo_devmgr.wire`` and
nothing of the daemon.
"""
from .library import (TRANSPORTS, AsyncClient, Client, ConnectionLost, DaemonUnreachable, DeviceError,
                      NotConnected, RequestTimeout, default_socket_path, tensor)

__all__ = ["TRANSPORTS", "AsyncClient", "Client", "ConnectionLost", "DaemonUnreachable", "DeviceError",
           "NotConnected", "RequestTimeout", "default_socket_path", "tensor"]
