"""Every field of the Fuzzfile reference (v1 and v4), and what Squall does with it.

Squall's contract: what validates runs as written; a field is honoured or refused at
validation with its reason, never ignored. `FIELDS` classifies every field of the schema
(`orchestrator/fuzzfile/schema.py`, which follows the reference field by field):

- `Honoured(proof)`: Squall does what the reference says; `proof` names the test that shows it.
- `Refused(snippet, code)`: validation refuses the field with its reason. The snippet is a
  small Fuzzfile that uses it; the line marked `# <-` must get an error of `code` on the
  field, and the same file without that line must validate.
- `Informational(why)`: the reference gives the field no effect (a name the map key
  overrides, free text), or no effect Squall's design leaves room for; why says which.
- `Gap(owner, proof)`: not done yet, owned by another piece of work, and refused before
  anything starts (`proof`), never ignored. Kept small on purpose.

`VALUES` holds values of honoured fields that validation refuses (schemes Squall cannot
fetch, annotations it does not read, device kinds no node has ...), `REFERENCE_ONLY` the
fields the reference lists as legacy and the schema does not accept at all.

A field added to the schema without a row here fails `test_every_field_is_classified`.
"""

from __future__ import annotations

import ast
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator.data.staging import _policy as transfer_policy
from orchestrator.fuzzfile import Severity, format_path, load_text
from orchestrator.fuzzfile.model import Affinity
from orchestrator.fuzzfile.schema import DOCUMENT_MODELS

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Honoured:
    proof: str  # tests/PATH.py::test_name


@dataclass(frozen=True)
class Refused:
    snippet: str  # a Fuzzfile; "# <-" marks the line that must be refused
    code: str


@dataclass(frozen=True)
class Informational:
    why: str


@dataclass(frozen=True)
class Gap:
    owner: str
    proof: str  # the test that shows it is refused before anything starts


Fate = Honoured | Refused | Informational | Gap

IMAGE = "    image: {uri: docker://busybox:1.36}\n"
SIF = "    image:\n      uri: oras://example.org/lib/a.sif:1\n"
JOB_J = f"jobs:\n  j:\n{IMAGE}    command: [/bin/true]\n"


def job(lines: str, version: str = "v4", image: str = IMAGE) -> str:
    """A Fuzzfile with job `j`, `lines` added to it (indented by 4)."""
    return f"version: {version}\njobs:\n  j:\n{image}    command: [/bin/true]\n" + lines


def service(lines: str, image: str = IMAGE) -> str:
    """A Fuzzfile with persisting service `s` (port `web`), `lines` added to it."""
    return (
        f"version: v4\nservices:\n  s:\n{image}    persist: true\n"
        "    network:\n      ports:\n        - {name: web, port: 8080}\n" + lines
    )


def with_job(head: str, version: str = "v4") -> str:
    """A Fuzzfile of `head` (top-level sections) and job `j`."""
    return f"version: {version}\n" + head + JOB_J


def transfer(direction: str, lines: str = "") -> str:
    """A Fuzzfile with volume `v` holding one transfer; `lines` go in it (indented by 8,
    or by 10 to add to the destination)."""
    source, destination = (
        ("https://example.org/in.txt", "file://in.txt")
        if direction == "ingress"
        else ("file://out.txt", "s3://results/out.txt")
    )
    return with_job(
        f"volumes:\n  v:\n    {direction}:\n"
        f"      - source:\n          uri: {source}\n"
        f"        destination:\n          uri: {destination}\n" + lines
    )


V1_VOLUME = "volumes:\n  v:\n    reference: volume://user/ephemeral\n"


def endpoint(lines: str) -> str:
    return service("      endpoints:\n        - name: site\n          port-name: web\n" + lines)


# ---- proofs --------------------------------------------------------------------------------

ENGINE = "tests/orchestrator/test_engine.py::"
FIDELITY = "tests/orchestrator/test_fidelity_runs.py::"
PROBES = "tests/orchestrator/test_probes.py::"
CONTAINERS = "tests/substrate/test_containers.py::"
LEASES = "tests/substrate/test_leases.py::"
MODEL = "tests/fuzzfile/test_model.py::"
TRANSFERS = "tests/orchestrator/test_transfers.py::"
HERE = "tests/fuzzfile/test_reference_coverage.py::"

DAG = Honoured(ENGINE + "test_a_dag_with_a_task_array_runs_to_the_end")
RETRIES_TIMEOUTS = Honoured(ENGINE + "test_failures_retries_timeouts_and_independent_branches")
DEFAULTS = Honoured(MODEL + "test_defaults_merge_into_jobs_field_by_field")
DEFAULT_RESOURCE = Honoured(HERE + "test_defaults_resource_reaches_every_job")
V1_EQUALS_V4 = Honoured(MODEL + "test_v1_and_v4_load_to_equal_models")
ENDPOINTS = Honoured(FIDELITY + "test_endpoints_reach_the_service_its_dependents_and_itself")
AGENT_RUN = Honoured(CONTAINERS + "test_env_cwd_mounts_files_and_exit_code")
PRIVATE_IMAGE = Honoured(
    "tests/orchestrator/test_private_images.py::"
    "test_a_private_image_runs_with_its_secret_in_both_forms"
)
MULTINODE = Gap(
    "multi-node jobs (MPI wire-up)",
    ENGINE + "test_bad_input_is_refused_before_anything_starts",
)
NAME_KEY = Informational("the reference: accepted and ignored in favour of the map key")
DESCRIPTION = Informational("free text for people (the reference gives it no effect)")

SOCKETS = "sockets"
EXPOSE = "expose"
HOST_VOLUME = "host-volume"
DECRYPTION = "decryption-secret"
TRANSFER_SECRET = "transfer-secret"
TRANSFER_SECRETS = "transfer-secrets"
PROBE_HOST = "probe-host"


def _container(kind: str) -> dict[str, Fate]:
    """What jobs and services share: one RunRequest to the agent is built for both."""
    p = f"{kind}.*."
    snippet = job if kind == "jobs" else service
    return {
        p + "args": Honoured(CONTAINERS + "test_scripts_run_with_their_args"),
        p + "command": DAG,
        p + "cwd": AGENT_RUN,
        p + "depends-on.[].description": DESCRIPTION,
        p + "depends-on.[].name": Honoured(
            "tests/orchestrator/test_scheduler.py::test_fan_out_and_fan_in"
        ),
        p + "depends-on.[].status": ENDPOINTS,
        p + "env": Honoured(ENGINE + "test_a_secret_reaches_the_container_and_no_record"),
        p + "files": AGENT_RUN,
        p + "image.uri": DAG,
        p + "image.secret": PRIVATE_IMAGE,
        p + "image.secrets": PRIVATE_IMAGE,
        p + "image.decryption-secret": Refused(
            snippet("", image=SIF + "      decryption-secret: secret://user/KEY  # <-\n"),
            DECRYPTION,
        ),
        p + "mounts.*.location": V1_EQUALS_V4,
        p + "mounts.*.volume": Honoured(ENGINE + "test_a_persistent_volume_outlives_its_run"),
        p + "multinode.implementation": MULTINODE,
        p + "multinode.nodes": MULTINODE,
        p + "multinode.procs-per-node": MULTINODE,
        p + "name": NAME_KEY,
        p + "requires": V1_EQUALS_V4,
        p + "resource.annotations": Honoured(
            "tests/orchestrator/test_placing.py::"
            "test_data_far_away_goes_to_its_region_with_its_volumes_on_the_cluster"
        ),
        p + "resource.cpu.affinity": Honoured(LEASES + "test_socket_affinity"),
        p + "resource.cpu.cores": Honoured(CONTAINERS + "test_only_leased_cores_are_visible"),
        p + "resource.cpu.sockets": Refused(
            snippet("    resource:\n      cpu:\n        sockets: 2  # <-\n"), SOCKETS
        ),
        p + "resource.cpu.threads": Honoured(
            LEASES + "test_threads_hand_out_every_hardware_thread_of_the_cores"
        ),
        p + "resource.devices": Honoured(
            "tests/substrate/test_agent_api.py::test_tasks_see_only_their_leased_gpus"
        ),
        p + "resource.exclusive": Honoured(LEASES + "test_exclusive_needs_and_keeps_an_idle_node"),
        p + "resource.memory.by-core": Honoured(LEASES + "test_memory_by_core_and_memory_shortage"),
        p + "resource.memory.size": Honoured(CONTAINERS + "test_memory_limit_oom_kill_is_reported"),
        p + "script": DAG,
    }


FIELDS: dict[str, Fate] = {
    "version": Honoured("tests/fuzzfile/test_corpus.py::test_upgrade_gives_equal_model"),
    "files": Honoured(TRANSFERS + "test_inline_files"),
    "annotations": Informational(
        "free metadata (`description`, Fuzzball's `fuzzball.io/connect/SERVICE` hint for its "
        "`workflow connect`); Squall reads no squall.io/ key here and refuses one (VALUES)"
    ),
    # ---- defaults.job: merged into every job, where the job's own fields win
    "defaults.job.env": DEFAULTS,
    "defaults.job.mounts.*.location": DEFAULTS,
    "defaults.job.mounts.*.volume": V1_EQUALS_V4,
    "defaults.job.policy.retry.attempts": DEFAULTS,
    "defaults.job.policy.timeout.execute": DEFAULTS,
    "defaults.job.resource.annotations": DEFAULT_RESOURCE,
    "defaults.job.resource.cpu.affinity": DEFAULTS,
    "defaults.job.resource.cpu.cores": DEFAULT_RESOURCE,
    "defaults.job.resource.cpu.sockets": Refused(
        with_job("defaults:\n  job:\n    resource:\n      cpu:\n        sockets: 2  # <-\n"),
        SOCKETS,
    ),
    "defaults.job.resource.cpu.threads": DEFAULT_RESOURCE,
    "defaults.job.resource.devices": DEFAULT_RESOURCE,
    "defaults.job.resource.exclusive": DEFAULT_RESOURCE,
    "defaults.job.resource.memory.by-core": DEFAULT_RESOURCE,
    "defaults.job.resource.memory.size": DEFAULTS,
    # ---- jobs
    **_container("jobs"),
    "jobs.*.network.isolated": Honoured(CONTAINERS + "test_port_forward_into_an_isolated_network"),
    "jobs.*.network.expose-tcp": Refused(
        job("    network:\n      expose-tcp: [8888]  # <-\n"), EXPOSE
    ),
    "jobs.*.network.expose-udp": Refused(
        job("    network:\n      expose-udp: [5353]  # <-\n"), EXPOSE
    ),
    "jobs.*.policy.retry.attempts": RETRIES_TIMEOUTS,
    "jobs.*.policy.timeout.execute": RETRIES_TIMEOUTS,
    "jobs.*.task-array.start": DAG,
    "jobs.*.task-array.end": DAG,
    "jobs.*.task-array.concurrency": Honoured(
        "tests/orchestrator/test_examples_run.py::test_a_200_task_array_runs_at_most_8_at_a_time"
    ),
    # ---- services
    **_container("services"),
    "services.*.persist": Honoured(
        "tests/orchestrator/test_scheduler.py::test_a_persisting_service_keeps_the_run_going"
    ),
    "services.*.policy.timeout.execute": Honoured(
        FIDELITY + "test_a_service_is_stopped_and_failed_at_its_time_limit"
    ),
    "services.*.policy.retry": Refused(
        service("    policy:\n      retry: {attempts: 2}  # <-\n"), "service-retry"
    ),
    "services.*.autoscaler": Refused(
        service("    autoscaler: {replicas: {min: 1, max: 4}}  # <-\n"), "autoscaler"
    ),
    "services.*.dynamic-config": Refused(
        service("    dynamic-config: {path: /etc/peers, script: 'true'}  # <-\n"), "dynamic-config"
    ),
    "services.*.network.host": ENDPOINTS,
    "services.*.network.ports.[].name": Honoured(
        PROBES + "test_http_get_path_port_name_and_headers"
    ),
    "services.*.network.ports.[].port": ENDPOINTS,
    "services.*.network.ports.[].protocol": Informational(
        "the pod network carries tcp and udp alike, to every port: the protocol only says "
        "what the port speaks"
    ),
    "services.*.network.endpoints.[].name": ENDPOINTS,
    "services.*.network.endpoints.[].port-name": ENDPOINTS,
    "services.*.network.endpoints.[].protocol": ENDPOINTS,
    "services.*.network.endpoints.[].scope": ENDPOINTS,
    "services.*.network.endpoints.[].type": Informational(
        "the shape of a URL of Fuzzball's endpoint proxy (subdomain or path); Squall has no "
        "proxy: every endpoint URL is direct (SERVICE.svc:PORT) and FB_ENDPOINT_PATH is /"
    ),
    "services.*.network.endpoints.[].annotations": Informational(
        "metadata for clients (such as ciq.com/api: openai); no squall.io/ key (VALUES)"
    ),
    "services.*.network.endpoints.[].per-replica": Refused(
        endpoint("          per-replica: true  # <-\n"), "per-replica"
    ),
    "services.*.readiness-probe.exec.command": ENDPOINTS,
    "services.*.readiness-probe.http-get.path": Honoured(
        PROBES + "test_http_get_path_port_name_and_headers"
    ),
    "services.*.readiness-probe.http-get.port": Honoured(
        PROBES + "test_http_get_path_port_name_and_headers"
    ),
    "services.*.readiness-probe.http-get.http-headers.[].name": Honoured(
        PROBES + "test_http_get_path_port_name_and_headers"
    ),
    "services.*.readiness-probe.http-get.http-headers.[].value": Honoured(
        PROBES + "test_http_get_path_port_name_and_headers"
    ),
    "services.*.readiness-probe.http-get.host": Refused(
        service(
            "    readiness-probe:\n      http-get:\n        port: web\n"
            "        host: 169.254.169.254  # <-\n"
        ),
        PROBE_HOST,
    ),
    "services.*.readiness-probe.http-get.scheme": Honoured(PROBES + "test_http_get_https_scheme"),
    "services.*.readiness-probe.tcp-socket.port": Honoured(
        PROBES + "test_tcp_socket_open_and_closed_port"
    ),
    "services.*.readiness-probe.tcp-socket.host": Refused(
        service(
            "    readiness-probe:\n      tcp-socket:\n        port: web\n"
            "        host: 10.0.0.1  # <-\n"
        ),
        PROBE_HOST,
    ),
    "services.*.readiness-probe.grpc.port": Honoured(
        PROBES + "test_grpc_health_check_with_its_service_name"
    ),
    "services.*.readiness-probe.grpc.service": Honoured(
        PROBES + "test_grpc_health_check_with_its_service_name"
    ),
    "services.*.readiness-probe.timeout-seconds": Honoured(
        PROBES + "test_timeout_seconds_bounds_a_probe_that_gets_no_answer"
    ),
    "services.*.readiness-probe.initial-delay-seconds": ENDPOINTS,
    "services.*.readiness-probe.period-seconds": ENDPOINTS,
    "services.*.readiness-probe.success-threshold": ENDPOINTS,
    "services.*.readiness-probe.failure-threshold": Informational(
        "as in Kubernetes, failures before the first success only keep a service not ready "
        "(Squall keeps probing until it is); Squall does not probe a ready service again, so "
        "there are no later failures to count"
    ),
    # ---- volumes
    "volumes.*.name": Honoured(ENGINE + "test_a_persistent_volume_outlives_its_run"),
    "volumes.*.reference": Honoured(MODEL + "test_volumes_normalise"),
    "volumes.*.use": Honoured(MODEL + "test_v4_volume_forms"),
    "volumes.*.size": Honoured(
        FIDELITY + "test_a_volume_gets_its_size_or_the_run_fails_before_any_job"
    ),
    "volumes.*.annotations": Honoured(
        "tests/orchestrator/test_placing.py::"
        "test_data_far_away_goes_to_its_region_with_its_volumes_on_the_cluster"
    ),
    "volumes.*.type": Refused(with_job(V1_VOLUME + "    type: HOST  # <-\n", "v1"), HOST_VOLUME),
    "volumes.*.path": Refused(with_job(V1_VOLUME + "    path: /srv  # <-\n", "v1"), HOST_VOLUME),
    "volumes.*.ingress.[].source.uri": Honoured(
        TRANSFERS + "test_https_download_with_progress_and_size"
    ),
    "volumes.*.ingress.[].source.secret": Honoured(TRANSFERS + "test_s3_egress_then_ingress"),
    "volumes.*.ingress.[].destination.uri": Honoured(TRANSFERS + "test_inline_files"),
    "volumes.*.egress.[].source.uri": Honoured(TRANSFERS + "test_s3_egress_then_ingress"),
    "volumes.*.egress.[].destination.uri": Honoured(TRANSFERS + "test_s3_egress_then_ingress"),
    "volumes.*.egress.[].destination.secret": Honoured(TRANSFERS + "test_s3_egress_then_ingress"),
    "volumes.*.ingress.[].destination.secret": Refused(
        transfer("ingress", "          secret: secret://user/KEY  # <-\n"), TRANSFER_SECRET
    ),
    "volumes.*.egress.[].source.secret": Refused(
        transfer("egress", "").replace(
            "uri: file://out.txt\n",
            "uri: file://out.txt\n          secret: secret://user/K  # <-\n",
        ),
        TRANSFER_SECRET,
    ),
    **{
        f"volumes.*.{direction}.[].policy.{field}": Honoured(
            HERE + "test_transfer_policy_reaches_the_copy"
        )
        for direction in ("ingress", "egress")
        for field in ("retry.attempts", "timeout.execute")
    },
    **{
        f"volumes.*.{direction}.[].{side}.secrets": Refused(
            transfer(direction, "").replace(
                f"uri: {uri}\n", f"uri: {uri}\n          secrets: {{username: u}}  # <-\n"
            ),
            TRANSFER_SECRETS,
        )
        for direction, uri_of in (
            ("ingress", {"source": "https://example.org/in.txt", "destination": "file://in.txt"}),
            ("egress", {"source": "file://out.txt", "destination": "s3://results/out.txt"}),
        )
        for side, uri in uri_of.items()
    },
    **{
        f"volumes.*.{direction}.[].{side}.decryption-secret": Refused(
            transfer(direction, "").replace(
                f"uri: {uri}\n", f"uri: {uri}\n          decryption-secret: secret://user/K  # <-\n"
            ),
            DECRYPTION,
        )
        for direction, uri_of in (
            ("ingress", {"source": "https://example.org/in.txt", "destination": "file://in.txt"}),
            ("egress", {"source": "file://out.txt", "destination": "s3://results/out.txt"}),
        )
        for side, uri in uri_of.items()
    },
}

# Values of honoured fields that validation refuses: (field, snippet, code).
VALUES: list[tuple[str, str, str]] = [
    (
        "volumes.*.ingress.[].source.uri",
        transfer("ingress", "").replace("https://example.org/in.txt", "hf://meta/llama  # <-"),
        "transfer-uri",
    ),
    (
        "volumes.*.ingress.[].source.uri",
        transfer("ingress", "").replace("https://example.org/in.txt", "ftp://example.org/x  # <-"),
        "transfer-uri",
    ),
    (
        "volumes.*.egress.[].destination.uri",
        transfer("egress", "").replace("s3://results/out.txt", "https://example.org/up  # <-"),
        "transfer-uri",
    ),
    (
        "jobs.*.resource.annotations",
        job("    resource:\n      annotations:\n        squall.io/expected-runtime: soon  # <-\n"),
        "bad-annotation",
    ),
    (
        "jobs.*.resource.annotations",
        job("    resource:\n      annotations:\n        squall.io/arch: aarch64  # <-\n"),
        "bad-annotation",
    ),
    (
        "jobs.*.resource.annotations",
        job("    resource:\n      annotations:\n        squall.io/expected-runtme: 1h  # <-\n"),
        "unknown-annotation",
    ),
    (
        "jobs.*.resource.annotations",
        job("    resource:\n      annotations:\n        cpu_arch: epyc  # <-\n"),
        "unknown-annotation",
    ),
    (
        "defaults.job.resource.annotations",
        with_job(
            "defaults:\n  job:\n    resource:\n      annotations:\n"
            "        squall.io/arch: x86  # <-\n"
        ),
        "bad-annotation",
    ),
    (
        "volumes.*.annotations",
        with_job("volumes:\n  v:\n    annotations:\n      squall.io/location: us-west-2  # <-\n"),
        "bad-annotation",
    ),
    (
        "volumes.*.annotations",
        with_job("volumes:\n  v:\n    annotations:\n      squall.io/ingress-size: lots  # <-\n"),
        "bad-annotation",
    ),
    (
        "volumes.*.annotations",
        with_job("volumes:\n  v:\n    annotations:\n      tier: fast  # <-\n"),
        "unknown-annotation",
    ),
    (
        "annotations",
        with_job("annotations:\n  squall.io/location: aws:us-west-2  # <-\n"),
        "unknown-annotation",
    ),
    (
        "services.*.network.endpoints.[].annotations",
        endpoint("          annotations:\n            squall.io/public: 'yes'  # <-\n"),
        "unknown-annotation",
    ),
    (
        "jobs.*.resource.devices",
        job("    resource:\n      devices:\n        cerebras.net/wse2: 1  # <-\n"),
        "device-kind",
    ),
    (
        "volumes.*.use",
        with_job("volumes:\n  v:\n    use: fast-nvme  # <-\n"),
        "provisioner",
    ),
    (
        "volumes.*.reference",
        with_job("volumes:\n  v:\n    reference: volume://user/scratch-ssd/x  # <-\n"),
        "provisioner",
    ),
    (
        "services.*.network.endpoints.[].name",
        endpoint("        - name: SITE  # <-\n          port-name: web\n"),
        "duplicate-endpoint",
    ),
]

# Fields the reference lists as legacy and the schema refuses as unknown keys.
REFERENCE_ONLY: dict[str, str] = {
    "completed": with_job("completed: {status: FINISHED}  # <-\n"),
    "services.*.export": service("    export: workflow  # <-\n"),
    "services.*.proxy": service("    proxy: [{name: web, port: 8080}]  # <-\n"),
    "services.*.task-array": service("    task-array: {start: 1, end: 2}  # <-\n"),
    "services.*.network.isolated": service("").replace(
        "    network:\n", "    network:\n      isolated: true  # <-\n"
    ),
    "services.*.network.ports.[].export": service("").replace(
        "{name: web, port: 8080}", "{name: web, port: 8080, export: PUBLIC}  # <-"
    ),
    "jobs.*.taskArray": job("    taskArray: {start: 1, end: 2}  # <-\n"),
    "jobs.*.dependsOn": job("    dependsOn: [{name: x}]  # <-\n"),
}


# ---- walking the schema ---------------------------------------------------------------------


def _unwrap(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, type(int | None)):
        return [x for a in typing.get_args(annotation) for x in _unwrap(a)]
    return [annotation]


def _walk(model: type[BaseModel], prefix: str, out: set[str]) -> None:
    """Every leaf field under `model`, as a dotted path (`*`: a map key, `[]`: a list item)."""
    for name, info in model.model_fields.items():
        path = prefix + (info.alias or name)
        leaf = True
        for kind in _unwrap(info.annotation):
            step = ""
            while typing.get_origin(kind) in (dict, list):
                step += ".*" if typing.get_origin(kind) is dict else ".[]"
                kind = _unwrap(typing.get_args(kind)[-1])[0]
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                _walk(kind, path + step + ".", out)
                leaf = False
        if leaf:
            out.add(path)


def schema_fields() -> set[str]:
    found: set[str] = set()
    for document in DOCUMENT_MODELS.values():
        _walk(document, "", found)
    return found


def _classified(field: str) -> bool:
    if field in FIELDS:
        return True
    # a refused section covers what is inside it
    return any(
        isinstance(fate, Refused) and field.startswith(key + ".") for key, fate in FIELDS.items()
    )


def test_every_field_is_classified() -> None:
    fields = schema_fields()
    assert len(fields) > 150  # the walk sees the whole schema
    unclassified = sorted(f for f in fields if not _classified(f))
    assert unclassified == [], "classify these fields in FIELDS: " + ", ".join(unclassified)
    stale = sorted(
        k for k in FIELDS if k not in fields and not any(f.startswith(k + ".") for f in fields)
    )
    assert stale == [], "no such field in the schema: " + ", ".join(stale)


def test_the_known_gaps_are_few() -> None:
    owners = {fate.owner for fate in FIELDS.values() if isinstance(fate, Gap)}
    assert owners == {"multi-node jobs (MPI wire-up)"}


# ---- honoured: the proofs exist ---------------------------------------------------------------


def _test_names(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


PROOFS = sorted(
    {fate.proof for fate in FIELDS.values() if isinstance(fate, Honoured | Gap)},
)


@pytest.mark.parametrize("proof", PROOFS)
def test_each_proof_is_a_test_that_exists(proof: str) -> None:
    path, _, name = proof.partition("::")
    assert name.startswith("test_")
    assert name in _test_names(path), f"{proof} does not exist"


# ---- refused: the field, on its line, with a reason ------------------------------------------


def _names(field: str) -> tuple[str | int, ...]:
    """The field path of `field` in the snippets: jobs.j, services.s, volumes.v, item 0."""
    concrete = {"jobs": "j", "services": "s", "volumes": "v", "mounts": "/data"}
    out: list[str | int] = []
    for part in field.split("."):
        if part == "*":
            out.append(concrete[str(out[-1])])
        elif part == "[]":
            out.append(0)
        else:
            out.append(part)
    return tuple(out)


def _assert_refused(field: str, snippet: str, code: str, *, alone: bool = True) -> None:
    """`snippet` gets error `code` on `field` (any list item), on its line marked `# <-`,
    saying what to do instead; with `alone`, the snippet validates without that line."""
    lines = snippet.splitlines()
    [marked] = [i + 1 for i, line in enumerate(lines) if line.endswith("# <-")]
    result = load_text(snippet, "wf.yaml")
    assert not result.ok, f"{field}: the snippet validates"
    where = format_path(_names(field))
    pattern = re.compile(re.escape(where).replace(r"\[0\]", r"\[\d+\]") + r"([.\[].*)?$")
    found = [(d.code, d.field, d.line) for d in result.errors]
    hit = [d for d in result.errors if d.code == code and d.line == marked]
    hit = [d for d in hit if pattern.match(d.field)]
    assert hit, f"{field}: wanted {code} on {where} line {marked}, got {found}"
    assert hit[0].hint or "write" in hit[0].message, f"{field}: say what to do instead"
    if alone:
        without = "\n".join(line for line in lines if not line.endswith("# <-")) + "\n"
        assert load_text(without, "wf.yaml").ok, f"{field}: the snippet is wrong without it"


REFUSED = sorted((k, f) for k, f in FIELDS.items() if isinstance(f, Refused))


@pytest.mark.parametrize(("field", "fate"), REFUSED, ids=[k for k, _ in REFUSED])
def test_refused_fields_are_refused_where_they_are_written(field: str, fate: Refused) -> None:
    _assert_refused(field, fate.snippet, fate.code)


@pytest.mark.parametrize(
    ("field", "snippet", "code"), VALUES, ids=[f"{f}:{c}:{i}" for i, (f, _, c) in enumerate(VALUES)]
)
def test_values_that_would_not_run_are_refused(field: str, snippet: str, code: str) -> None:
    assert isinstance(FIELDS[field], Honoured | Informational)
    _assert_refused(field, snippet, code, alone=False)


@pytest.mark.parametrize(("field", "snippet"), sorted(REFERENCE_ONLY.items()))
def test_legacy_fields_of_the_reference_are_unknown_keys(field: str, snippet: str) -> None:
    assert field not in schema_fields()
    lines = snippet.splitlines()
    [marked] = [i + 1 for i, line in enumerate(lines) if line.endswith("# <-")]
    result = load_text(snippet, "wf.yaml")
    assert [(d.code, d.line) for d in result.errors] == [("unknown-key", marked)]
    assert result.errors[0].hint


# ---- honoured in the model the engine consumes -------------------------------------------------


def test_defaults_resource_reaches_every_job() -> None:
    """defaults.job.resource fills what a job leaves out, field by field (the scheduler and
    the leases read the merged resource)."""
    wf = load_text(
        with_job(
            "defaults:\n  job:\n    resource:\n"
            "      cpu: {cores: 3, affinity: NUMA, threads: true}\n"
            "      memory: {size: 1GiB, by-core: true}\n"
            "      devices: {nvidia.com/gpu: 1}\n"
            "      exclusive: true\n"
            "      annotations: {squall.io/arch: arm64}\n"
        )
        + f"  k:\n{IMAGE}    command: [/bin/true]\n    resource: {{cpu: {{cores: 1}}}}\n"
    ).unwrap()
    j, k = wf.jobs["j"].resource, wf.jobs["k"].resource
    assert (j.cores, j.affinity, j.threads) == (3, Affinity.NUMA, True)
    assert (j.memory, j.memory_by_core, j.memory_per_node) == (2**30, True, 3 * 2**30)
    assert (dict(j.devices), j.exclusive) == ({"nvidia.com/gpu": 1}, True)
    assert dict(j.annotations) == {"squall.io/arch": "arm64"}
    assert k.cores == 1  # the job's own value wins
    assert k.affinity is Affinity.NUMA


def test_transfer_policy_reaches_the_copy() -> None:
    """A transfer's policy becomes the time limit and attempts of its copy."""
    wf = load_text(
        transfer(
            "ingress",
            "        policy:\n          timeout: {execute: 30m}\n          retry: {attempts: 4}\n",
        )
    ).unwrap()
    [t] = wf.volumes["v"].ingress
    policy = transfer_policy(t)
    assert (policy.timeout, policy.attempts) == (1800, 5)  # the first try and 4 retries


def test_an_endpoint_said_public_validates_with_a_warning() -> None:
    """`scope: public` is in the public corpus: it validates, and is told it stays private."""
    result = load_text(endpoint("          scope: public\n"), "wf.yaml")
    assert result.ok
    [warning] = [d for d in result.diagnostics if d.code == "endpoint-not-public"]
    assert warning.severity is Severity.WARNING
    assert warning.field == "services.s.network.endpoints[0].scope"
    assert "http://s.svc:8080/" in warning.message
    assert "squall workflow port-forward" in (warning.hint or "")
