"""The typed views of runs: unchanged by a trip through the control API's messages, printed
by `-o json` in the shape scripts read; and `watch`, the one loop that follows a run, over a
real store."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from api.squall.v1 import control_pb2 as pb
from orchestrator.store import RUN_ENDED, Event, Run, RunState, Store
from orchestrator.view_types import RUN_ENDED_STATES
from orchestrator.views import (
    EVENTS_PER_UPDATE,
    EventView,
    JobView,
    RunListItem,
    RunView,
    TransferView,
    watch,
)

AT = datetime(2026, 12, 3, 9, 30, 1, 123456, tzinfo=UTC)
RUN = RunView(
    id="0f8fad5b",
    name="me/pipeline-1",
    owner="me",
    site="local",
    state="RUNNING",
    reason="",
    # what JSON holds: whole numbers, fractions, nesting, null
    placement={
        "site": "local",
        "estimate": {"total_usd": 2.0, "hours": 0.25},
        "nodes": [{"cpus": 2, "memory_bytes": 2**40, "gpus": 0}],
        "alternatives": [],
        "note": None,
    },
    created_at=AT,
    started_at=AT + timedelta(seconds=1),
    finished_at=None,
    jobs=(
        JobView(
            name="count",
            kind="job",
            state="RUNNING",
            reason="",
            tasks=8,
            task_states={"FINISHED": 5, "RUNNING": 3},
            attempts=9,
            nodes=("node-0", "node-1"),
            started_at=AT + timedelta(seconds=2),
            finished_at=None,
        ),
        JobView(
            name="web",
            kind="service",
            state="PENDING",
            reason="waiting for count",
            tasks=1,
            task_states={"PENDING": 1},
            attempts=0,
            nodes=(),
            started_at=None,
            finished_at=None,
        ),
    ),
    transfers=(
        TransferView(
            direction="egress",
            volume="work",
            source="file://output/counts.txt",
            destination="s3://bucket/counts.txt",
            state="RUNNING",
            bytes_done=2**40 + 1,  # past 32 bits
            error="",
        ),
    ),
)


def test_views_round_trip_through_the_control_api_messages() -> None:
    wire = pb.Workflow.FromString(RUN.to_message().SerializeToString())
    assert RunView.from_message(wire) == RUN
    placed = RunView.from_message(wire).placement
    assert placed is not None
    assert placed["nodes"][0]["cpus"] == 2
    assert isinstance(placed["nodes"][0]["cpus"], int)  # not 2.0
    assert RunView.from_message(wire).to_json() == RUN.to_json()
    unplaced = RunView(**{**vars(RUN), "placement": None, "started_at": None})
    assert RunView.from_message(unplaced.to_message()) == unplaced
    item = RunListItem("0f8fad5b", "me/x", "me", "", "PENDING", "", AT)
    assert RunListItem.from_message(item.to_message()) == item
    capped = RunListItem("0f8fad5b", "me/x", "me", "", "RUNNING", "", AT, 0.25, 1.5)
    assert RunListItem.from_message(capped.to_message()) == capped
    budgeted = RunView(**{**vars(RUN), "cost_usd": 0.5, "budget_usd": 2.0})
    assert RunView.from_message(budgeted.to_message()) == budgeted
    for state in (None, "FINISHED", ""):
        event = EventView(7, AT, "task", "count[3]", "finished (exit 0)", state)
        message = pb.Event.FromString(event.to_message().SerializeToString())
        assert EventView.from_message(message) == event


def test_json_is_the_shape_scripts_read() -> None:
    shown = RUN.to_json()
    assert list(shown) == [
        "id",
        "name",
        "owner",
        "site",
        "state",
        "reason",
        "placement",
        "created_at",
        "started_at",
        "finished_at",
        "jobs",
        "transfers",
        "cost_usd",
        "budget_usd",
    ]
    assert shown["created_at"] == "2026-12-03T09:30:01.123456+00:00"
    assert shown["finished_at"] is None
    assert shown["placement"] == RUN.placement
    assert shown["jobs"][0] == {
        "name": "count",
        "kind": "job",
        "state": "RUNNING",
        "reason": "",
        "tasks": 8,
        "task_states": {"FINISHED": 5, "RUNNING": 3},
        "attempts": 9,
        "nodes": ["node-0", "node-1"],
        "started_at": "2026-12-03T09:30:03.123456+00:00",
        "finished_at": None,
    }
    assert list(shown["transfers"][0]) == [
        "direction",
        "volume",
        "source",
        "destination",
        "state",
        "bytes_done",
        "error",
    ]
    item = RunListItem("0f8fad5b", "me/x", "me", "", "PENDING", "", AT).to_json()
    assert list(item) == [
        "id",
        "name",
        "owner",
        "site",
        "state",
        "reason",
        "created_at",
        "cost_usd",
        "budget_usd",
    ]


def test_the_ended_states_are_the_stores() -> None:
    assert {s.value for s in RUN_ENDED} == RUN_ENDED_STATES


def _recorded(store: Store, state: RunState, events: int) -> str:
    """A run recorded in `state`, with `events` events."""
    run_id = str(uuid.uuid4())
    with store.session() as s:
        s.add(
            Run(
                id=run_id,
                name=f"me/{run_id}",
                owner="me",
                fuzzfile="",
                state=state,
                events=[
                    Event(kind="task", subject=f"count[{i}]", message="finished (exit 0)")
                    for i in range(events)
                ],
            )
        )
    return run_id


def test_watch_gives_every_event_of_an_ended_run_beyond_one_update(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'squall.db'}")
    run_id = _recorded(store, RunState.FAILED, EVENTS_PER_UPDATE + 5)
    updates = list(watch(store, run_id, interval=0))
    assert [len(events) for _, events in updates] == [EVENTS_PER_UPDATE, 5]
    assert [run.state for run, _ in updates] == ["FAILED", "FAILED"]
    ids = [e.id for _, events in updates for e in events]
    assert ids == sorted(set(ids))


def test_watch_of_an_owned_run_ends_when_its_owner_returns(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'squall.db'}")
    run_id = _recorded(store, RunState.RUNNING, 1)
    looks = 0

    def owner_done() -> bool:  # the engine ends the run, then takes a while to return
        nonlocal looks
        looks += 1
        if looks == 2:
            with store.session() as s:
                s.get_one(Run, run_id).state = RunState.FINISHED
        return looks >= 4

    updates = list(watch(store, run_id, owner_done=owner_done, interval=0))
    assert [run.state for run, _ in updates] == ["RUNNING", "TEARDOWN", "TEARDOWN", "FINISHED"]
    assert [len(events) for _, events in updates] == [1, 0, 0, 0]
    # without an owner, the store's word ends it
    assert [run.state for run, _ in watch(store, run_id, interval=0)] == ["FINISHED"]
