"""Schedules on a clock the test moves by hand (no sleeps): a firing at its moment, placed
by federation (the reference catalog under tests/catalog); a window that waits for a cheaper
moment (spot prices by hour of day, this machine busy until its run is expected to end);
missed moments after the scheduler was down; one firing at a time; paused schedules; and a
firing's run driven for real on this machine."""

from __future__ import annotations

import functools
import re
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from federate.outlook import SpotHistory
from orchestrator.data.staging import volume_roots
from orchestrator.engine import Engine
from orchestrator.errors import AlreadyExists, SquallError
from orchestrator.fuzzfile import load_text
from orchestrator.identity import add_user, set_disabled
from orchestrator.placing import Placer
from orchestrator.provision import LocalProvisioner, NodeSlice
from orchestrator.run_threads import RunThreads
from orchestrator.schedules import (
    Scheduler,
    ScheduleSpec,
    create_schedule,
    placer_pricer,
    set_paused,
    show_schedule,
)
from orchestrator.store import Firing, FiringState, Run, RunState, Schedule, Store
from tests.substrate.registry import Registry

CATALOG = Path(__file__).resolve().parents[1] / "catalog"
T0 = datetime(2026, 12, 5, 1, 0, tzinfo=UTC)

HELLO = textwrap.dedent("""\
    version: v4
    jobs:
      hello:
        image: {uri: docker://busybox:1.36}
        command: [/bin/sh, -c, "echo fired"]
        resource:
          cpu: {cores: 1}
          annotations: {squall.io/expected-runtime: 30m}
    """)


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def to(self, hour: int, minute: int = 0, day: int = 5) -> None:
        self.at = datetime(2026, 12, day, hour, minute, tzinfo=UTC)


class Started:
    """The starter: records each firing's run as a PENDING run in the store (as
    `Engine.submit` does), so that the scheduler sees it live until the test ends it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.names: list[str] = []

    def __call__(self, name: str, spec: ScheduleSpec) -> None:
        self.names.append(name)
        with self.store.session() as s:
            s.add(Run(id=name.replace("/", "_"), name=name, owner=spec.owner, fuzzfile=""))

    def end(self, name: str) -> None:
        with self.store.session() as s:
            s.scalars(select(Run).where(Run.name == name)).one().state = RunState.FINISHED


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'squall.db'}")


def scheduler(
    store: Store, clock: Clock, placer: Placer, spot: SpotHistory | None = None
) -> tuple[Scheduler, Started]:
    started = Started(store)
    return Scheduler(store, placer_pricer(placer, store, spot), started, clock=clock), started


def firings(store: Store) -> list[tuple[str, FiringState, str]]:
    with store.session() as s:
        rows = s.scalars(select(Firing).order_by(Firing.due_at)).all()
        return [(f"{f.due_at:%d %H:%M}", f.state, f.reason) for f in rows]


def test_a_schedule_fires_at_its_moment_once_at_the_cheapest_site(store: Store) -> None:
    clock = Clock(T0)
    create_schedule(store, "nightly", HELLO, "0 2 * * *", owner="me", now=clock())
    fires, started = scheduler(store, clock, Placer(catalog_dir=CATALOG))
    clock.to(1, 59)
    fires.tick()
    assert started.names == []
    assert firings(store) == []
    clock.to(2, 0)
    fires.tick()
    fires.tick()  # the same moment again: nothing more
    assert started.names == ["nightly-20261205-0200"]
    view = show_schedule(store, "nightly")
    [firing] = view.firings
    # this machine is free and fits: federation's choice, priced, with why
    assert (firing.state, firing.site, firing.estimate_usd) == ("STARTED", "local", 0.0)
    assert firing.reason.startswith("started at 2026-12-05 02:00 UTC on local")
    assert view.next_at == datetime(2026, 12, 6, 2, 0, tzinfo=UTC)
    # the next day's moment waits for nothing but the clock, once the first run ended
    started.end("nightly-20261205-0200")
    clock.to(2, 0, day=6)
    fires.tick()
    assert started.names == ["nightly-20261205-0200", "nightly-20261206-0200"]


def test_a_window_waits_for_the_cheaper_spot_hour(store: Store, tmp_path: Path) -> None:
    team = tmp_path / "team.yaml"  # the machine's policy lets runs use spot
    team.write_text("spot: true\n")
    policy = tmp_path / "policy.yaml"  # the schedule's narrows it to one region
    policy.write_text("allowed-clouds: [aws]\nallowed-regions: [us-east-1]\nspot: true\n")
    placer = Placer(catalog_dir=CATALOG, clouds_only=True, policy_file=team)
    chosen = placer.compare(load_text(HELLO).unwrap(), "x", policy=policy.read_text()).chosen
    assert chosen is not None
    [plan] = chosen.jobs
    assert plan.spot
    # observed: this type's spot price halves from 04:00 to 04:59 UTC, every day
    history = tmp_path / "spot.csv"
    lines = ["cloud,region,instance,at,usd_per_hour"]
    for day in (1, 2, 3):
        for hour in range(24):
            price = plan.usd_per_hour / 2 if hour == 4 else plan.usd_per_hour
            lines.append(
                f"aws,us-east-1,{plan.instance},2026-12-0{day}T{hour:02d}:10:00+00:00,{price}"
            )
    history.write_text("\n".join(lines) + "\n")
    clock = Clock(T0)
    create_schedule(
        store,
        "cheap",
        HELLO,
        "0 2 * * *",
        owner="me",
        window_seconds=3 * 3600,
        policy=policy.read_text(),
        now=clock(),
    )
    fires, started = scheduler(store, clock, placer, SpotHistory.load(history))
    clock.to(2, 0)
    fires.tick()
    [firing] = show_schedule(store, "cheap").firings
    assert firing.state == "WAITING"
    assert started.names == []
    assert firing.start_at == datetime(2026, 12, 5, 4, 0, tzinfo=UTC)
    assert firing.site == "aws:us-east-1"
    assert firing.reason.startswith("waiting for 2026-12-05 04:00 UTC, the cheapest moment")
    clock.to(3, 30)
    fires.tick()  # still dearer now than at 04:00
    assert started.names == []
    clock.to(4, 0)
    fires.tick()
    [firing] = show_schedule(store, "cheap").firings
    assert started.names == ["cheap-20261205-0200"]
    assert firing.state == "STARTED"
    assert firing.start_at == clock()
    assert firing.estimate_usd == pytest.approx(chosen.total_usd / 2)
    assert "the cheapest moment in its window" in firing.reason


def test_a_window_waits_for_this_machine_to_be_free(store: Store) -> None:
    # a run holds this machine since 01:30 and is expected to take an hour: free at 02:30
    with store.session() as s:
        s.add(
            Run(
                id="busy",
                name="me/busy",
                owner="me",
                fuzzfile="",
                state=RunState.RUNNING,
                site="local",
                held_from=datetime(2026, 12, 5, 1, 30, tzinfo=UTC),
                placement={"estimate": {"hours": 1.0, "total_usd": 0.0}},
            )
        )
    clock = Clock(T0)
    create_schedule(
        store, "later", HELLO, "0 2 * * *", owner="me", window_seconds=2 * 3600, now=clock()
    )
    fires, started = scheduler(store, clock, Placer(catalog_dir=CATALOG))
    clock.to(2, 0)
    fires.tick()
    [firing] = show_schedule(store, "later").firings
    # a cloud could take it now, for money; this machine is free, later in the window
    assert firing.state == "WAITING"
    assert (firing.site, firing.start_at) == ("local", datetime(2026, 12, 5, 2, 30, tzinfo=UTC))
    assert "now $" in firing.reason
    assert "at 02:30 $0.00 on local" in firing.reason
    clock.to(2, 30)
    fires.tick()
    [firing] = show_schedule(store, "later").firings
    assert (firing.state, firing.site) == ("STARTED", "local")
    assert started.names == ["later-20261205-0200"]


def test_missed_moments_run_the_latest_once_within_its_window(store: Store) -> None:
    clock = Clock(T0)
    create_schedule(
        store, "hourly", HELLO, "0 * * * *", owner="me", window_seconds=30 * 60, now=clock()
    )
    placer = Placer(catalog_dir=CATALOG)
    fires, started = scheduler(store, clock, placer)
    other = Scheduler(store, placer_pricer(placer, store), started, clock=clock)
    # no scheduler ran from 01:00 to 04:10; then two come back at once
    clock.to(4, 10)
    threads = [threading.Thread(target=f.tick) for f in (fires, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert started.names == ["hourly-20261205-0400"]
    states = [(when, state) for when, state, _ in firings(store)]
    assert states == [  # created at 01:00: its first moment was 02:00
        ("05 02:00", FiringState.MISSED),
        ("05 03:00", FiringState.MISSED),
        ("05 04:00", FiringState.STARTED),
    ]
    assert "only the latest may still start" in firings(store)[0][2]
    # down again past the next moment's window: it is missed, not run late
    started.end("hourly-20261205-0400")
    clock.to(5, 45)
    fires.tick()
    when, state, why = firings(store)[-1]
    assert (when, state) == ("05 05:00", FiringState.MISSED)
    assert "its window ended at 2026-12-05 05:30 UTC" in why
    assert started.names == ["hourly-20261205-0400"]


def test_a_firing_waits_for_the_previous_run_and_is_skipped_past_its_window(
    store: Store,
) -> None:
    clock = Clock(T0)
    create_schedule(
        store, "often", HELLO, "*/30 * * * *", owner="me", window_seconds=20 * 60, now=clock()
    )
    fires, started = scheduler(store, clock, Placer(catalog_dir=CATALOG))
    clock.to(1, 30)
    fires.tick()
    assert started.names == ["often-20261205-0130"]
    clock.to(2, 0)
    fires.tick()  # the 01:30 run is still live
    assert started.names == ["often-20261205-0130"]
    assert firings(store)[-1][1:] == (
        FiringState.WAITING,
        "waiting for the previous run often-20261205-0130 (PENDING) to end",
    )
    clock.to(2, 20)
    fires.tick()
    assert firings(store)[-1][1] is FiringState.SKIPPED
    assert "still live when its window ended" in firings(store)[-1][2]
    started.end("often-20261205-0130")
    clock.to(2, 30)
    fires.tick()
    assert started.names == ["often-20261205-0130", "often-20261205-0230"]


def test_a_paused_schedule_does_not_fire_and_resumes_from_its_next_moment(store: Store) -> None:
    clock = Clock(T0)
    create_schedule(store, "p", HELLO, "0 * * * *", owner="me", now=clock())
    fires, started = scheduler(store, clock, Placer(catalog_dir=CATALOG))
    set_paused(store, "p", True, now=clock())
    clock.to(3, 5)
    fires.tick()
    assert started.names == []
    assert firings(store) == []
    view = set_paused(store, "p", False, now=clock())
    assert view.next_at == datetime(2026, 12, 5, 4, 0, tzinfo=UTC)
    clock.to(4, 0)
    fires.tick()
    assert started.names == ["p-20261205-0400"]


def test_a_firing_no_site_can_take_within_its_budget_fails_with_why(
    store: Store, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("allowed-clouds: [aws]\nallowed-sites: [nowhere]\n")
    clock = Clock(T0)
    create_schedule(
        store,
        "dear",
        HELLO,
        "0 2 * * *",
        owner="me",
        budget_usd=0.0001,
        policy=policy.read_text(),
        now=clock(),
    )
    fires, started = scheduler(store, clock, Placer(catalog_dir=CATALOG))
    clock.to(2, 0)
    fires.tick()
    [(_, state, why)] = firings(store)
    assert state is FiringState.FAILED
    assert started.names == []
    assert why.startswith("no site can run it: ")
    assert "over the budget of $0.00" in why


def test_bad_schedules_are_refused_and_record_nothing(store: Store, tmp_path: Path) -> None:
    bad = [
        (("x", HELLO, "0 25 * * *"), {}, "cron '0 25 * * *': Bad hour"),
        (("x y", HELLO, "0 2 * * *"), {}, "schedule name 'x y'"),
        (("x", "version: v4\njobs: {}\n", "0 2 * * *"), {}, "jobs"),
        (("x", HELLO, "0 2 * * *"), {"window_seconds": 8 * 86400.0}, "between 0 and 7 days"),
        (("x", HELLO, "0 2 * * *"), {"window_seconds": float("nan")}, "between 0 and 7 days"),
        (("x", HELLO, "0 2 * * *"), {"budget_usd": -1.0}, "above 0"),
        (("x", HELLO, "0 2 * * *"), {"budget_usd": float("inf")}, "above 0"),
        (("x", HELLO, "0 2 * * *"), {"policy": "allowed-clouds: aws\n"}, "must be a list"),
        (("x", HELLO, "*/10 * * * * *"), {}, "not five fields"),
    ]
    for args, extra, message in bad:
        with pytest.raises(SquallError, match=re.escape(message)):
            create_schedule(store, *args, owner="me", **extra)  # type: ignore[arg-type]
    create_schedule(store, "x", HELLO, "0 2 * * *", owner="me")
    with pytest.raises(AlreadyExists):
        create_schedule(store, "x", HELLO, "0 3 * * *", owner="me")
    with store.session() as s:
        assert len(s.scalars(select(Firing)).all()) == 0


def test_a_firing_runs_its_workflow_here(tmp_path: Path, registry: Registry) -> None:
    """The production starter: the firing's run driven by a real engine on this machine."""
    store = Store(f"sqlite:///{tmp_path / 'squall.db'}")
    provisioner = LocalProvisioner(
        tmp_path / "site",
        nodes=lambda _: [NodeSlice(cpus=(0, 1), memory_bytes=2**30)],
        search_registries=[registry.address],
        insecure_registries=[registry.address],
        volume_roots=functools.partial(volume_roots, tmp_path / "data"),
    )
    placer = Placer(catalog_dir=CATALOG, store=store)
    engine = Engine(store, [provisioner], data_dir=tmp_path / "data", placer=placer.decide)
    runs = RunThreads(engine)

    def start(name: str, spec: ScheduleSpec) -> None:
        runs.launch(name, spec.fuzzfile, spec.owner, spec.budget_usd, spec.policy)

    clock = Clock(T0)
    create_schedule(store, "real", HELLO, "0 2 * * *", owner="me", budget_usd=5.0, now=clock())
    fires = Scheduler(store, placer_pricer(placer, store), start, clock=clock)
    clock.to(2, 0)
    fires.tick()
    run = _ended(store, "real-20261205-0200")
    assert (run.state, run.site, run.budget_usd) == (RunState.FINISHED, "local", 5.0)
    [firing] = show_schedule(store, "real").firings
    assert (firing.state, firing.run_name) == ("STARTED", "real-20261205-0200")


def _ended(store: Store, name: str, timeout: float = 120.0) -> Run:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with store.session() as s:
            run = s.scalars(select(Run).where(Run.name == name)).first()
            if run is not None and run.state in (
                RunState.FINISHED,
                RunState.FAILED,
                RunState.CANCELLED,
            ):
                s.expunge(run)
                return run
        time.sleep(0.2)
    raise AssertionError(f"{name} did not end")


def test_a_moment_claimed_by_another_scheduler_counts_as_live(store: Store) -> None:
    """One scheduler claimed the 01:30 firing and is submitting its run: another one that
    looks at 02:00 waits for it, as for a live run."""
    clock = Clock(T0)
    create_schedule(store, "pair", HELLO, "*/30 * * * *", owner="me", now=clock())
    fires, started = scheduler(store, clock, Placer(catalog_dir=CATALOG))
    with store.session() as s:
        row = s.scalars(select(Schedule).where(Schedule.name == "pair")).one()
        s.add(
            Firing(
                schedule_id=row.id,
                due_at=datetime(2026, 12, 5, 1, 30, tzinfo=UTC),
                state=FiringState.STARTED,
                start_at=datetime(2026, 12, 5, 1, 59, 30, tzinfo=UTC),
                run_name="pair-20261205-0130",
            )
        )
        row.next_at = datetime(2026, 12, 5, 2, 0, tzinfo=UTC)
    clock.to(2, 0)
    fires.tick()
    assert started.names == []
    assert firings(store)[-1][1:] == (
        FiringState.WAITING,
        "waiting for the previous run pair-20261205-0130 (being submitted) to end",
    )


def test_a_short_window_is_not_stretched_to_the_grace(store: Store) -> None:
    clock = Clock(T0)
    create_schedule(store, "short", HELLO, "0 2 * * *", owner="me", window_seconds=60, now=clock())
    fires, started = scheduler(store, clock, Placer(catalog_dir=CATALOG))
    clock.to(2, 3)
    fires.tick()
    [(_, state, why)] = firings(store)
    assert state is FiringState.MISSED
    assert "its window ended at 2026-12-05 02:01 UTC" in why
    assert started.names == []


def test_a_disabled_owners_schedule_starts_nothing(store: Store) -> None:
    clock = Clock(T0)
    add_user(store, "bob", ["bio"])
    create_schedule(store, "bobs", HELLO, "0 2 * * *", owner="bob", now=clock())
    fires, started = scheduler(store, clock, Placer(catalog_dir=CATALOG))
    set_disabled(store, "bob")
    clock.to(2, 0)
    fires.tick()
    assert started.names == []
    assert [(state, why) for _, state, why in firings(store)] == [
        (FiringState.FAILED, "its owner bob is disabled")
    ]
    set_disabled(store, "bob", False)  # enabled again: the next moment runs
    clock.to(2, 0, day=6)
    fires.tick()
    assert started.names == ["bobs-20261206-0200"]
