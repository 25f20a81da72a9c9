"""Federation: the price catalog, sites, the cost model, the placement optimizer and policies.

Pure functions of a `Workload` (what the orchestrator makes of a workflow), a catalog, sites
and a policy; nothing here imports the rest of Squall.
"""
