"""The control-plane gRPC API: the server (`server`), who may call it and what for (`gate`:
tokens, the access policy of `iam`, the `audit` log), and the error mapping."""

from .server import ControlServer, serve

__all__ = ["ControlServer", "serve"]
