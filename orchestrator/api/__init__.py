"""The control-plane gRPC API: the server, its authentication, and the error mapping."""

from .server import ControlServer, serve

__all__ = ["ControlServer", "serve"]
