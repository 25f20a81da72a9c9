"""The job/service DAG of a workflow: stages in run order, as text or as Graphviz DOT."""

from __future__ import annotations

import graphlib
import json

from .model import DependencyStatus, Job, Service, Workflow
from .units import format_size

__all__ = ["render_dot", "render_text", "stages"]


def stages(wf: Workflow) -> list[list[str]]:
    """Names grouped by the earliest stage they can start in (an acyclic workflow only).

    A container's stage is one more than the latest stage among what it depends on, so
    everything in a stage can run at once once the stages before it have.
    """
    containers = wf.containers
    graph = {
        name: [d.name for d in c.depends_on if d.name in containers]
        for name, c in containers.items()
    }
    level: dict[str, int] = {}
    for name in graphlib.TopologicalSorter(graph).static_order():
        level[name] = 1 + max((level[d] for d in graph[name]), default=-1)
    out: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for name in containers:  # file order within a stage
        out[level[name]].append(name)
    return out


def _summary(c: Job | Service) -> str:
    r = c.resource
    parts = [f"{r.cores} core{'s' if r.cores != 1 else ''}"]
    if r.memory_per_node is not None:
        parts.append(format_size(r.memory_per_node))
    parts.extend(f"{count}x {device}" for device, count in r.devices.items() if count)
    if c.multinode:
        parts.append(f"{c.multinode.nodes} nodes {c.multinode.implementation}")
    if isinstance(c, Job) and c.task_array:
        ta = c.task_array
        limit = f", {ta.concurrency} at a time" if ta.concurrency else ""
        parts.append(f"{ta.size} tasks{limit}")
    if isinstance(c, Service):
        parts.append("service, persists" if c.persist else "service")
    return ", ".join(parts)


def render_text(wf: Workflow) -> str:
    """Stages in order, each container with its resources and what it waits for."""
    lines = []
    for i, names in enumerate(stages(wf), start=1):
        lines.append(f"stage {i}")
        for name in names:
            c = wf.containers[name]
            line = f"  {name}  ({_summary(c)})"
            if c.depends_on:
                waits = ", ".join(
                    d.name + (" running" if d.status is DependencyStatus.RUNNING else "")
                    for d in c.depends_on
                )
                line += f"  <- {waits}"
            lines.append(line)
    return "\n".join(lines) + "\n"


def render_dot(wf: Workflow, title: str = "workflow") -> str:
    """A Graphviz digraph: edges run from a dependency to what waits for it."""
    q = json.dumps  # DOT string quoting is JSON's for the characters names can hold
    lines = [f"digraph {q(title)} {{", "  rankdir=LR;", "  node [shape=box, style=rounded];"]
    for name, c in wf.containers.items():
        shape = ", shape=ellipse" if isinstance(c, Service) else ""
        label = f"{name}\\n{_summary(c)}"
        lines.append(f"  {q(name)} [label={q(label).replace(chr(92) * 2, chr(92))}{shape}];")
    for name, c in wf.containers.items():
        for d in c.depends_on:
            style = " [style=dashed, label=running]" if d.status is DependencyStatus.RUNNING else ""
            lines.append(f"  {q(d.name)} -> {q(name)}{style};")
    lines.append("}")
    return "\n".join(lines) + "\n"
