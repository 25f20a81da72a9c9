"""Pulumi programs that build one ephemeral cluster per run from a `ClusterSpec`.

`spec.py` holds the spec and the safety rules every cloud shares; `aws.py`, `gcp.py` and
`azure.py` declare a cluster (nothing is created at import); `program.build` picks one and
exports the agents; `config.py` carries a spec in stack configuration, which is how
`__main__.py` (the program `Pulumi.yaml` names) gets it. infra knows nothing of workflows.
"""
