"""A workflow as federation sees it: each job's node needs and expected runtime, and where its
data comes from and goes to, with sizes (and which of those figures are guesses).

Annotations Squall reads (all optional):
- on a job's `resource.annotations`: `squall.io/expected-runtime` (a duration, per task),
  `nvidia.com/gpu.model` / `amd.com/gpu.model` (e.g. "NVIDIA H100 80GB HBM3"),
  `squall.io/arch` (default x86_64)
- on a volume's `annotations`: `squall.io/ingress-size` and `squall.io/egress-size` (total bytes
  of its transfers each way, e.g. 200GB), `squall.io/location` (where its s3 data lives, e.g.
  aws:us-west-2) and `squall.io/tags` (residency tags, e.g. eu)

Runtime without an annotation comes from earlier runs of the same workflow (the median of
the last ten that finished), else the job's time limit, an upper bound (and said so); without
any of those it is unknown and federation assumes an hour, and says that too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from federate.workload import DataMove, JobNeeds, Place, Workload

from .data import RemoteFacts
from .errors import InvalidInput, SquallError
from .fuzzfile.model import Job, Workflow
from .fuzzfile.units import parse_duration, parse_size

__all__ = ["workload_of"]

GIB = 2**30


def _place(uri: str, location: str, tags: frozenset[str], buckets: Mapping[str, str]) -> Place:
    if uri.startswith("s3://"):
        bucket = uri.removeprefix("s3://").split("/", 1)[0]
        where = buckets.get(bucket) or location
        if not where:
            return Place("internet", tags=tags)  # unknown: priced as the internet, said below
        cloud, _, region = where.partition(":")
        if not region:
            raise InvalidInput(f"{where!r}: write a location as CLOUD:REGION, e.g. aws:us-west-2")
        return Place("cloud", cloud, region, tags=tags)
    if uri.startswith("file:///"):
        return Place("site", site="local", tags=tags)
    return Place("internet", tags=tags)


Look = Callable[[str, str | None], RemoteFacts]  # uri, secret reference -> facts


def workload_of(
    wf: Workflow,
    name: str,
    buckets: Mapping[str, str] | None = None,
    look: Look | None = None,
    history: Mapping[str, float] | None = None,
) -> Workload:
    """`buckets` maps an s3 bucket to where it lives (CLOUD:REGION), overriding annotations;
    `look` asks a source for its size (and a bucket for its region) when it can be reached;
    `history` gives jobs' hours per task from earlier runs of the same workflow."""
    buckets = dict(buckets or {})
    jobs = []
    for job in wf.containers.values():  # a service holds a node group too, like a job
        r = job.resource
        ann = r.annotations
        if "squall.io/expected-runtime" in ann:
            hours: float | None = parse_duration(ann["squall.io/expected-runtime"]) / 3600
            source = "annotation"
        elif history and job.name in history:
            hours, source = history[job.name], "history"
        elif job.policy.timeout:
            hours, source = job.policy.timeout / 3600, "timeout (an upper bound)"
        else:
            hours, source = None, "unknown"
        ta = job.task_array if isinstance(job, Job) else None
        jobs.append(
            JobNeeds(
                name=job.name,
                cores=r.cores,
                memory_gib=(r.memory_per_node or 0) / GIB,
                gpus=sum(v for k, v in r.devices.items() if "gpu" in k.lower()),
                gpu_model=ann.get("nvidia.com/gpu.model") or ann.get("amd.com/gpu.model", ""),
                nodes=job.multinode.nodes if job.multinode else 1,
                multinode=job.multinode is not None,
                tasks=ta.size if ta else 1,
                concurrency=ta.concurrency if ta else None,
                runtime_hours=hours,
                runtime_source=source,
                depends_on=tuple(d.name for d in job.depends_on),
                arch=ann.get("squall.io/arch", "x86_64"),
            )
        )
    moves = []
    for volume in wf.volumes.values():
        ann = volume.annotations
        tags = frozenset(t.strip() for t in ann.get("squall.io/tags", "").split(",") if t.strip())
        location = ann.get("squall.io/location", "")
        for direction, transfers in (("ingress", volume.ingress), ("egress", volume.egress)):
            total = ann.get(f"squall.io/{direction}-size")
            for i, t in enumerate(transfers):
                uri = (t.source if direction == "ingress" else t.destination).uri
                facts = None
                if look is not None and direction == "ingress" and not uri.startswith("file://"):
                    try:
                        facts = look(uri, t.source.secret)
                    except SquallError:
                        facts = None  # unreachable from here: annotations, else unknown
                if facts is not None and facts.region and uri.startswith("s3://"):
                    bucket = uri.removeprefix("s3://").split("/", 1)[0]
                    buckets.setdefault(bucket, f"aws:{facts.region}")
                if uri.startswith("file://") and direction == "ingress":
                    size: int | None = len(wf.files.get(uri.removeprefix("file://"), ""))
                    how = "object metadata"
                elif facts is not None and facts.size is not None:
                    size, how = facts.size, "object metadata"
                elif total is not None and i == 0:
                    size, how = parse_size(total), "annotation"
                else:
                    size, how = None, "unknown"
                moves.append(
                    DataMove(direction, uri, _place(uri, location, tags, buckets), size, how)
                )
    features = {"volumes"} if wf.volumes else set()
    if any(v.persistent for v in wf.volumes.values()):
        features.add("persistent volumes")
    if any(c.multinode for c in wf.containers.values()):
        features.add("multinode")
    return Workload(
        name,
        tuple(jobs),
        tuple(moves),
        features=frozenset(features),
        storage_gib=_storage_gib(wf, moves),
    )


def _storage_gib(wf: Workflow, moves: list[DataMove]) -> int:
    """What a cluster's storage must hold for the run's ephemeral volumes, in whole GiB:
    each volume's `size`, or, for one without, what its ingress brings (where known); at least
    1 GiB when there are some, 0 when there are none (persistent volumes live on a share of
    their own on a cloud, and on this machine's disk here)."""
    ephemeral = [v for v in wf.volumes.values() if not v.persistent]
    if not ephemeral:
        return 0
    fetched = {m.uri: m.size_bytes or 0 for m in moves if m.direction == "ingress"}
    total = 0
    for volume in ephemeral:
        if volume.size is not None:
            total += volume.size
        else:
            total += sum(fetched.get(t.source.uri, 0) for t in volume.ingress)
    return max(1, -(-total // 2**30))
