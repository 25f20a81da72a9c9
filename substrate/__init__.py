"""The `substrate` node agent: gRPC server, inventory, leases, container runtimes, logs, exec.

It ships inside node images, so it imports nothing of Squall's but the API stubs. It is built
by the substrate issue; until then this package is empty.
"""
