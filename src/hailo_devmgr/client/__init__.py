# The client library: what a service needs to use the device manager. Ships
# in python3-hailo-devmgr with hailo_devmgr.wire and nothing of the daemon.
from . import library
from .library import (TRANSPORTS, AsyncClient, AsyncGeneration, Client, ConnectionLost, DaemonUnreachable,
                      DeviceError, Generation, NotConnected, RequestTimeout, default_socket_path, tensor)

__doc__ = library.__doc__   # help(hailo_devmgr.client): the library's reference

__all__ = ["TRANSPORTS", "AsyncClient", "AsyncGeneration", "Client", "ConnectionLost", "DaemonUnreachable",
           "DeviceError", "Generation", "NotConnected", "RequestTimeout", "default_socket_path", "tensor"]
