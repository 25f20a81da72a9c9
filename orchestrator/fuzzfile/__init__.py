"""Fuzzfiles (v1 and v4): load, validate, normalise, upgrade and render them.

from orchestrator.fuzzfile import load_file
result = load_file("hello.yaml")
for d in result.diagnostics:
    print(d.render())
workflow = result.unwrap()        # raises FuzzfileError when invalid
"""

from .diagnostics import Diagnostic, FieldPath, Severity, format_path
from .loader import FuzzfileError, LoadResult, load_file, load_text
from .model import Job, Service, Volume, Workflow

__all__ = [
    "Diagnostic",
    "FieldPath",
    "FuzzfileError",
    "Job",
    "LoadResult",
    "Service",
    "Severity",
    "Volume",
    "Workflow",
    "format_path",
    "load_file",
    "load_text",
]
