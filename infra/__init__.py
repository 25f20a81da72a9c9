"""Pulumi programs that build one ephemeral cluster per run from a `ClusterSpec`.

`spec.py` holds the spec and the safety rules every cloud shares. The per-cloud programs (one
ComponentResource each; nothing created at import) are still to come, so `Pulumi.yaml` has no
program to run yet.
"""
