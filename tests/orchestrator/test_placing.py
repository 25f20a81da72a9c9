"""The engine asks federation where to run: the local site when it is the choice (or forced),
and a clear refusal, with the estimate recorded, when a cloud region is cheaper. The catalog
is the dated reference snapshot under tests/catalog."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from orchestrator.data.staging import volume_roots
from orchestrator.engine import Engine
from orchestrator.fuzzfile import load_text
from orchestrator.placing import Placer
from orchestrator.provision import LocalProvisioner, NodeSlice
from orchestrator.provision.cloud import CloudProvisioner
from orchestrator.store import Run, RunState, Store
from tests.substrate.registry import Registry

CATALOG = Path(__file__).resolve().parents[1] / "catalog"

BIG_DATA = """version: v4
volumes:
  data:
    annotations:
      squall.io/ingress-size: 5000GB
      squall.io/location: aws:us-west-2
    ingress:
      - source: {uri: s3://genomes/reads.tar}
        destination: {uri: file://reads.tar}
jobs:
  crunch:
    image: {uri: docker://busybox:1.36}
    command: [/bin/true]
    resource:
      cpu: {cores: 1}
      annotations: {squall.io/expected-runtime: 1h}
"""

GPUS = """version: v4
jobs:
  train:
    image: {uri: docker://busybox:1.36}
    command: [/bin/true]
    resource:
      cpu: {cores: 8}
      devices: {nvidia.com/gpu: 8}
      annotations: {squall.io/expected-runtime: 1h}
"""

SMALL = """version: v4
jobs:
  hello:
    image: {uri: docker://busybox:1.36}
    command: [/bin/sh, -c, "echo placed"]
    resource:
      cpu: {cores: 1}
      annotations: {squall.io/expected-runtime: 10m}
"""


@pytest.fixture
def make_engine(tmp_path: Path, registry: Registry):  # type: ignore[no-untyped-def]
    def make(placer: Placer) -> Engine:
        provisioner = LocalProvisioner(
            tmp_path / "site",
            nodes=lambda _: [NodeSlice(cpus=(0, 1), memory_bytes=2**30)],
            search_registries=[registry.address],
            insecure_registries=[registry.address],
            volume_roots=functools.partial(volume_roots, tmp_path / "data"),
        )
        return Engine(
            Store(f"sqlite:///{tmp_path / 'squall.db'}"),
            [provisioner],
            data_dir=tmp_path / "data",
            placer=placer.decide,
        )

    return make


def test_data_far_away_goes_to_its_region_with_its_volumes_on_the_cluster(tmp_path: Path) -> None:
    """Federation prices where the data lives (here, 5,000 GB in aws:us-west-2): the run goes
    there, its one node holding the volume on its own disk, instead of pulling the data to
    this machine; a persistent volume, which a cloud cluster's storage cannot keep, keeps it
    here and says why, unless the sites file names a share for persistent volumes there."""
    comparison = Placer(catalog_dir=CATALOG).compare(load_text(BIG_DATA).unwrap(), "me/big")
    by_site = {e.site.name: e for e in comparison.estimates}
    region, local = by_site["aws:us-west-2"], by_site["local"]
    assert comparison.chosen is region
    assert region.total_usd < local.total_usd
    assert (region.storage, region.data_usd) == ("node-local", 0.0)  # the data is next door
    # pulling 5,000 GB out of AWS to this machine: the internet tiers, allowance not counted
    assert local.data_usd == pytest.approx(5000 * 0.09)

    persistent = BIG_DATA.replace("  data:\n", "  data:\n    name: genomes\n", 1)
    kept = Placer(catalog_dir=CATALOG).compare(load_text(persistent).unwrap(), "me/kept")
    by_site = {e.site.name: e for e in kept.estimates}
    assert by_site["aws:us-west-2"].reasons == [CloudProvisioner.cannot["persistent volumes"]]
    assert kept.chosen is by_site["local"]
    # unless the region has a share of the team's for persistent volumes: then it goes there
    sites = tmp_path / "sites.yaml"
    sites.write_text("persistent:\n  aws:us-west-2: 10.0.0.9:/team-volumes\n")
    shared = Placer(catalog_dir=CATALOG, sites_file=sites).compare(
        load_text(persistent).unwrap(), "me/kept"
    )
    assert shared.chosen is not None
    assert shared.chosen.site.name == "aws:us-west-2"
    assert shared.chosen.site.persistent_share == "10.0.0.9:/team-volumes"


def test_a_run_placed_elsewhere_starts_nothing_here(make_engine, tmp_path: Path) -> None:
    engine = make_engine(Placer(catalog_dir=CATALOG))
    outcome = engine.run("me/gpus", GPUS)
    assert outcome.state is RunState.FAILED
    assert outcome.reason.startswith("federation placed it on ")
    assert outcome.reason.endswith("force it with --site local")
    assert not (tmp_path / "site").exists()  # no agent was started


def test_the_local_site_runs_when_it_is_the_choice_or_forced(make_engine) -> None:
    engine = make_engine(Placer(catalog_dir=CATALOG))
    outcome = engine.run("me/small", SMALL)
    assert outcome.state is RunState.FINISHED, outcome.reason
    with engine.store.session() as s:
        placement = s.get_one(Run, outcome.run_id).placement
    assert placement["site"] == "local"
    assert placement["estimate"]["total_usd"] == 0
    assert placement["catalog_date"] == "2026-09-20"
    assert placement["nodes"] == [{"cpus": 2, "memory_bytes": 2**30, "gpus": 0}]

    forced = make_engine(Placer(catalog_dir=CATALOG, force_site="local")).run(
        "me/forced",
        BIG_DATA.replace("s3://genomes/reads.tar", "file://reads.tar")
        + "files:\n  reads.tar: hello\n",
    )
    assert forced.state is RunState.FINISHED, forced.reason


def test_a_policy_that_allows_no_site_fails_the_run_with_the_reasons(
    make_engine, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("allowed-sites: [lab]\nallowed-clouds: [nowhere]\n")
    outcome = make_engine(Placer(catalog_dir=CATALOG, policy_file=policy)).run("me/none", SMALL)
    assert outcome.state is RunState.FAILED
    assert outcome.reason.startswith(
        "no site is feasible (local: policy: site local is not allowed"
    )


def test_sizes_and_the_bucket_region_come_from_the_sources_themselves(
    make_engine, tmp_path: Path
) -> None:
    import getpass
    import json

    from orchestrator.secrets import SecretStore
    from tests.orchestrator.servers import FileServer, S3Server

    web = FileServer(tmp_path, {"small.txt": b"x" * 1234})
    s3 = S3Server(tmp_path)
    try:
        client = s3.client()
        client.create_bucket(
            Bucket="reads", CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
        )
        client.put_object(Bucket="reads", Key="r.bin", Body=b"y" * 4321)
        store = Store(f"sqlite:///{tmp_path / 'secrets.db'}")
        secrets = SecretStore(store, tmp_path / "secrets.key")
        secrets.put("secret://user/S3", getpass.getuser(), json.dumps(s3.credentials).encode())
        placer = Placer(catalog_dir=CATALOG, secrets=secrets, ca_file=web.ca_file)
        workflow = f"""version: v4
volumes:
  data:
    ingress:
      - source: {{uri: "{web.url}/small.txt"}}
        destination: {{uri: file://small.txt}}
      - source: {{uri: s3://reads/r.bin, secret: secret://user/S3}}
        destination: {{uri: file://r.bin}}
jobs:
  crunch:
    image: {{uri: docker://busybox:1.36}}
    command: [/bin/true]
    resource: {{annotations: {{squall.io/expected-runtime: 1h}}}}
"""
        from orchestrator.federation import workload_of
        from orchestrator.fuzzfile import load_text

        wf = load_text(workflow, "w").unwrap()
        record = placer.place(wf, "me/sizes")
        moves = workload_of(
            wf, "me/sizes", look=functools.partial(placer._look, getpass.getuser())
        ).data
    finally:
        web.stop()
        s3.stop()
    assert record["site"] == "local"
    assert record["estimate"]["guesses"] == []  # both sizes are the sources' own
    local = record["estimate"]
    assert local["data_usd"] == pytest.approx(4321 / 1e9 * 0.09)  # out of AWS us-west-2
    assert [(str(m.place), m.size_bytes, m.size_source) for m in moves] == [
        ("internet", 1234, "object metadata"),
        ("aws:us-west-2", 4321, "object metadata"),  # the region, from the bucket itself
    ]


def test_runtimes_come_from_earlier_runs_of_the_same_workflow(make_engine) -> None:
    placer = Placer(catalog_dir=CATALOG)
    engine = make_engine(placer)
    placer.store = engine.store
    text = """version: v4
jobs:
  nap:
    image: {uri: docker://busybox:1.36}
    command: [sleep, "1"]
"""
    first = engine.run("me/nap-1", text)
    assert first.state is RunState.FINISHED, first.reason
    with engine.store.session() as s:
        placement = s.get_one(Run, first.run_id).placement
    assert (
        "nap: runtime assumed 1 h (no annotation, history or timeout)"
        in placement["estimate"]["guesses"]
    )

    from orchestrator.fuzzfile import load_text

    record = placer.place(load_text(text, "w").unwrap(), "me/nap-2")
    assert "nap: runtime from history" in record["estimate"]["guesses"]
    best = record["alternatives"][0]
    assert 1 / 3600 <= best["hours"] < 10 / 3600  # about the second it took, not an hour


def test_compare_and_placing_choose_the_same_site_at_the_same_price(
    make_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One code path: the team's policy and sites file from the environment, the catalog
    shipped with Squall, the runtime of an earlier run from the store. `compare` is run as a
    user runs it (the CLI, in-process). (Data placement is priced in federate's tests and
    above: cloud sites take no volumes yet.)"""
    import json

    from typer.testing import CliRunner

    from cli.main import app

    for name in ("SQUALL_CATALOG", "SQUALL_STORE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # the s3 look fails at once here
    policy = tmp_path / "policy.yaml"
    policy.write_text("allowed-sites: [lab]\nallowed-clouds: [gcp, azure]\n")
    sites = tmp_path / "sites.yaml"
    sites.write_text("buckets:\n  genomes: aws:us-west-2\n")
    monkeypatch.setenv("SQUALL_POLICY", str(policy))
    monkeypatch.setenv("SQUALL_SITES", str(sites))
    nap = "version: v4\njobs:\n  crunch:\n    image: {uri: docker://busybox:1.36}\n"
    nap += "    command: [sleep, '1']\n"
    first = make_engine(Placer(force_site="local")).run("me/crunch-1", nap)
    assert first.state is RunState.FINISHED, first.reason

    workflow = """version: v4
jobs:
  crunch:
    image: {uri: docker://busybox:1.36}
    command: [/bin/true]
"""
    placer = Placer.from_environment()
    engine = make_engine(placer)
    placer.store = engine.store
    placed = engine.run("me/crunch-2", workflow)
    assert placed.state is RunState.FAILED  # placed on a cloud: nothing starts here
    with engine.store.session() as s:
        record = s.get_one(Run, placed.run_id).placement
    assert record["site"].split(":")[0] in ("gcp", "azure")  # the policy's clouds
    assert "crunch: runtime from history" in record["estimate"]["guesses"]
    assert record["estimate"]["hours"] < 10 / 3600  # the second the first run took

    file = tmp_path / "crunch.yaml"
    file.write_text(workflow)
    monkeypatch.setenv("SQUALL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SQUALL_STORE_URL", engine.store.url)
    shown = CliRunner().invoke(
        app, ["federate", "compare", str(file), "--name", "me/crunch-3", "-o", "json"]
    )
    assert shown.exit_code == 0, shown.output
    compared = json.loads(shown.stdout)
    assert compared["chosen"] == record["site"]
    assert compared["total_usd"] == round(record["estimate"]["total_usd"], 4)  # shown to 1/100 ¢
    assert compared["sites"][0]["guesses"] == record["estimate"]["guesses"]
    # and PLACING itself, asked directly, gives the same comparison
    again = placer.compare(load_text(workflow, "w").unwrap(), "me/crunch-3")
    assert again.as_dict()["sites"] == compared["sites"]
