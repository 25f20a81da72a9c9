"""Money while it is spent: a run carries its running cost (the placement's prices times the
hours it held its cluster), a run that reaches its budget is cancelled with the reason, its
finished results egressed and its cluster taken down, and a run that would break its team's
monthly budget is refused before anything starts.

The local site is priced through the sites file (`local: price:`), as a team charging itself
for a shared machine would: the runs here are real (agent processes, crun containers)."""

from __future__ import annotations

import functools
import os
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.data.staging import volume_roots
from orchestrator.engine import Engine
from orchestrator.placing import Placer
from orchestrator.provision import LocalProvisioner, NodeSlice
from orchestrator.store import Agent, Event, Job, Run, RunState, Store, TaskState
from orchestrator.views import run_list, run_summary
from tests.substrate.registry import Registry

CATALOG = Path(__file__).resolve().parents[1] / "catalog"
IMAGE = "image: {uri: docker://busybox:1.36}"
CORES = os.cpu_count() or 1
CORE_HOUR = 1800.0  # USD: this machine costs CORES x $0.50 a second


def flow(out: Path) -> str:
    """`make` writes a result and finishes; `long` would run two minutes after it."""
    return "version: v4\n" + textwrap.dedent(f"""
        volumes:
          data:
            egress:
              - source: {{uri: file://result.txt}}
                destination: {{uri: "file://{out}/result.txt"}}
        jobs:
          make:
            {IMAGE}
            command: [/bin/sh, -c, "echo made > /data/result.txt"]
            mounts: {{/data: {{volume: data}}}}
            resource: {{cpu: {{cores: 1}}, annotations: {{squall.io/expected-runtime: 1s}}}}
          long:
            {IMAGE}
            command: [/bin/sleep, "120"]
            depends-on: [{{name: make}}]
            resource: {{cpu: {{cores: 1}}, annotations: {{squall.io/expected-runtime: 1s}}}}
    """)


def placed_engine(tmp_path: Path, registry: Registry, sites: str, policy: str) -> Engine:
    """The local engine, placed by federation with the sites file and policy given."""
    (tmp_path / "sites.yaml").write_text(sites)
    (tmp_path / "policy.yaml").write_text(policy)
    provisioner = LocalProvisioner(
        tmp_path / "site",
        nodes=lambda _: [NodeSlice(cpus=(0, 1), memory_bytes=2**30)],
        search_registries=[registry.address],
        insecure_registries=[registry.address],
        volume_roots=functools.partial(volume_roots, tmp_path / "data"),
    )
    placer = Placer(
        catalog_dir=CATALOG,
        sites_file=tmp_path / "sites.yaml",
        policy_file=tmp_path / "policy.yaml",
    )
    return Engine(
        Store(f"sqlite:///{tmp_path / 'squall.db'}"),
        [provisioner],
        data_dir=tmp_path / "data",
        placer=placer.decide,
    )


@pytest.fixture
def priced(tmp_path: Path, registry: Registry) -> Engine:
    """This machine at CORE_HOUR a core, and the only site allowed."""
    return placed_engine(
        tmp_path,
        registry,
        f"local:\n  price: {{core-hour: {CORE_HOUR}}}\n",
        "allowed-sites: [local]\nallowed-clouds: [none]\n",
    )


def test_a_run_that_reaches_its_budget_is_stopped_with_its_results_out(
    priced: Engine, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    rate = CORES * CORE_HOUR / 3600  # USD a second
    budget = 6 * rate  # six seconds of the machine
    started = datetime.now(UTC)
    outcome = priced.run("me/capped", flow(out), budget_usd=budget)
    took = (datetime.now(UTC) - started).total_seconds()

    assert outcome.state is RunState.CANCELLED
    assert outcome.reason.startswith("budget reached: $"), outcome.reason
    assert took < 60, "the two-minute job was not stopped"
    with priced.store.session() as s:
        run = s.get_one(Run, outcome.run_id)
        jobs = dict(s.execute(select(Job.name, Job.state).where(Job.run_id == run.id)).all())
        held = (run.held_until - run.held_from).total_seconds()
        cost, placement = run.cost_usd, run.placement
        agents = s.scalars(select(Agent.pid).where(Agent.run_id == run.id)).all()
        budget_events = s.scalars(
            select(Event.message).where(Event.run_id == run.id, Event.kind == "budget")
        ).all()
    # the cost is the placement's rate times the hours held, and it reached the budget
    assert placement["rates"]["usd_per_hour"] == pytest.approx(CORES * CORE_HOUR)
    assert cost == pytest.approx(rate * held, rel=1e-6)
    assert cost >= budget
    assert budget_events == [outcome.reason]
    assert jobs == {"make": TaskState.FINISHED, "long": TaskState.CANCELLED}
    # what finished went out, and the cluster is gone
    assert (out / "result.txt").read_text() == "made\n"
    assert agents
    for pid in agents:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status"
        ).read_text(errors="replace")
    # status and list carry the cost and the budget
    view = run_summary(priced.store, outcome.run_id)
    assert (view.cost_usd, view.budget_usd) == (cost, budget)
    [item] = run_list(priced.store, "me/capped")
    assert (item.cost_usd, item.budget_usd) == (cost, budget)


def test_a_run_within_its_budget_finishes_and_keeps_its_cost(priced: Engine) -> None:
    text = "version: v4\njobs:\n  hello:\n    " + IMAGE + "\n    command: [/bin/true]\n"
    outcome = priced.run("me/cheap", text, budget_usd=10_000.0)
    assert outcome.state is RunState.FINISHED, outcome.reason
    with priced.store.session() as s:
        run = s.get_one(Run, outcome.run_id)
        held = (run.held_until - run.held_from).total_seconds()
        assert run.cost_usd == pytest.approx(CORES * CORE_HOUR / 3600 * held, rel=1e-6)
        assert 0 < run.cost_usd < 10_000


def test_a_site_estimated_over_the_budget_is_not_chosen(priced: Engine) -> None:
    text = (
        "version: v4\njobs:\n  hello:\n    "
        + IMAGE
        + "\n    command: [/bin/true]\n"
        + "    resource: {cpu: {cores: 1}, annotations: {squall.io/expected-runtime: 1h}}\n"
    )
    outcome = priced.run("me/dear", text, budget_usd=1.0)
    assert outcome.state is RunState.FAILED
    assert "over the budget of $1.00" in outcome.reason
    with priced.store.session() as s:
        run = s.get_one(Run, outcome.run_id)
        assert run.held_from is None
        assert run.cost_usd == 0
        assert not s.scalars(select(Agent).where(Agent.run_id == run.id)).all()


def test_a_run_that_would_break_the_monthly_budget_is_refused_before_it_starts(
    tmp_path: Path, registry: Registry
) -> None:
    engine = placed_engine(
        tmp_path,
        registry,
        "local:\n  price: {core-hour: 1.0}\n",
        "allowed-sites: [local]\nallowed-clouds: [none]\nteam: genomics\nmonthly-budget-usd: 100\n",
    )
    store = engine.store
    text = (
        "version: v4\njobs:\n  hello:\n    "
        + IMAGE
        + "\n    command: [/bin/true]\n"
        + "    resource: {cpu: {cores: 1}, annotations: {squall.io/expected-runtime: 1h}}\n"
    )
    first = engine.run("me/first", text)
    assert first.state is RunState.FINISHED, first.reason
    with store.session() as s:  # its budget: what was left of the month's
        assert s.get_one(Run, first.run_id).budget_usd == pytest.approx(100.0)
    # earlier this month the team spent $99.50 (another team's spending does not count)
    for name, team, cost in (("me/old", "genomics", 99.5), ("you/old", "physics", 1000.0)):
        with store.session() as s:
            s.add(
                Run(
                    id=name.replace("/", "-"),
                    name=name,
                    owner="me",
                    fuzzfile=text,
                    state=RunState.FINISHED,
                    team=team,
                    cost_usd=cost,
                    # created last month, ended this one: counted in the month it ended
                    created_at=datetime.now(UTC).replace(day=1) - timedelta(days=2),
                    finished_at=datetime.now(UTC),
                )
            )
    refused = engine.run("me/second", text)
    assert refused.state is RunState.FAILED
    assert refused.reason.startswith("refused: team genomics has spent or committed $99.5"), (
        refused.reason
    )
    assert "of its $100.00 monthly budget" in refused.reason
    with store.session() as s:
        run = s.get_one(Run, refused.run_id)
        assert run.team == "genomics"
        assert run.held_from is None
        assert not s.scalars(select(Agent).where(Agent.run_id == run.id)).all()


def test_a_runs_own_budget_and_a_schedules_policy_only_narrow_the_policy(tmp_path: Path) -> None:
    from orchestrator.fuzzfile import load_text

    policy = tmp_path / "policy.yaml"
    policy.write_text("allowed-clouds: [aws]\nbudget-usd: 1\nteam: genomics\n")
    placer = Placer(catalog_dir=CATALOG, policy_file=policy)
    text = "version: v4\njobs:\n  hello:\n    " + IMAGE + "\n    command: [/bin/true]\n"
    wf = load_text(text).unwrap()
    looser = "allowed-clouds: [gcp]\nbudget-usd: 1000\nteam: physics\nspot: true\n"
    comparison = placer.compare(wf, "me/x", budget_usd=1000.0, policy=looser)
    assert comparison.record()["budget"] == {
        "run_usd": 1.0,
        "team": "genomics",
        "monthly_usd": None,
    }
    clouds = [e for e in comparison.estimates if e.site.kind == "cloud"]
    assert clouds
    assert not any(e.feasible for e in clouds)  # aws and gcp: no cloud is in both
    assert comparison.policy.spot is False
    tighter = placer.compare(wf, "me/y", budget_usd=0.5).record()["budget"]
    assert tighter["run_usd"] == 0.5
