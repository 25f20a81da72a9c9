"""The `substrate` node agent: gRPC server, inventory, leases, container runtimes, logs, exec.

It ships inside node images, so it imports nothing of Squall's but the API stubs, and
depends only on grpcio, protobuf and httpx (its oras:// pulls). Start one with
`python -m substrate --help`.
"""

__version__ = "0.1.0"

# where every node of a cluster serves its agent (its own machine, or namespace); the stacks' too
AGENT_PORT = 7431
