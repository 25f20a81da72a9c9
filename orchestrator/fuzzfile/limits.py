"""How much a Fuzzfile may ask of Squall: bounds on the text, its YAML and its tasks.

A Fuzzfile comes from users (the API accepts it from anyone holding a token), so reading it
must cost a bounded time and memory whatever it holds. Each bound is far above what real
workflows use (the public corpus: at most 11 KiB, 7 levels, 272 YAML nodes, 72 tasks) and
is named in the error that a file beyond it gets.
"""

from __future__ import annotations

import math

__all__ = [
    "MAX_DEPTH",
    "MAX_FUZZFILE_BYTES",
    "MAX_NODES",
    "MAX_TASKS_PER_ARRAY",
    "MAX_TASKS_PER_WORKFLOW",
    "describe_bytes",
]

# The text, UTF-8 encoded. Scripts and small inputs fit inline many times over; data
# belongs in a volume's ingress. Also bounds what the gRPC API receives (api/server.py).
MAX_FUZZFILE_BYTES = 1024 * 1024

# Nesting of lists and mappings. A valid Fuzzfile is at most 8 levels deep (the schema has
# no free-form nested fields); the bound keeps the composer's recursion far from any limit.
MAX_DEPTH = 64

# Scalars, lists and mappings in the document, counting what aliases (*name) repeat: 180
# times the largest real file; reading one costs a few microseconds.
MAX_NODES = 50_000

# Tasks of one task array (`end - start + 1`): each is a row in the store and a container;
# AWS Batch caps array jobs at the same 10,000.
MAX_TASKS_PER_ARRAY = 10_000

# Tasks of the whole workflow (every job's tasks, one per job without an array, one per
# service), so that many arrays cannot add up to what one may not be.
MAX_TASKS_PER_WORKFLOW = 50_000


def describe_bytes(n: int) -> str:
    """`1 MiB`, `2.5 MiB`, `300 KiB` or `12 bytes`: a size for a message, rounded up (so that
    a size over a limit never reads as the limit)."""
    for unit, factor in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{math.ceil(n * 10 / factor) / 10:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"
