"""Federation: the price catalog, sites, the cost model, the placement optimizer and policies.

Pure functions of workflow, catalog and policy. Built by the federation issue; until then
this package is empty.
"""
