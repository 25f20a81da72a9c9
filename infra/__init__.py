"""Pulumi programs that build one ephemeral cluster per run from a `ClusterSpec`.

One ComponentResource per cloud; nothing is created at import. Built by the infra issue;
until then this package is empty and `Pulumi.yaml` has no program to run.
"""
