"""`.proto` files for the agent and control-plane gRPC APIs, and their generated stubs.

Arrives with the substrate issue; empty until then.
"""
