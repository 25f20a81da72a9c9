"""Scheduling decisions on real workflows, step by step, as the engine will ask for them."""

from __future__ import annotations

import random
import textwrap
from collections import Counter
from dataclasses import dataclass
from typing import Any

from orchestrator.fuzzfile import Workflow, load_text
from orchestrator.scheduler import Decision, Scheduler, TaskKey, job_state, tasks_of
from orchestrator.store import TaskState as Phase

IMAGE = "image: {uri: docker://busybox:1.36}"


def wf(body: str) -> Workflow:
    return load_text("version: v4\n" + textwrap.dedent(body), "wf.yaml").unwrap()


@dataclass
class Step:
    """What a scheduler says for `states`: every task that may start now, what to skip and
    stop, and whether the run is over."""

    start: list[TaskKey]
    skip: dict[str, str]
    stop: list[str]
    done: bool


def decide(workflow: Workflow, states: dict[TaskKey, Phase]) -> Step:
    s = Scheduler(workflow, states)
    d: Decision = s.decide()
    skip, stop = dict(d.skip), list(d.stop)
    while d.skip:  # as the run loop does: skipping a job's tasks may skip what follows
        for name in d.skip:
            for key in tasks_of(workflow.containers[name]):
                s.moved(key, Phase.SKIPPED)
        d = s.decide()
        skip.update(d.skip)
        stop += d.stop
    start = [k for name in d.ready for k in s.startable(name)]
    return Step(start, skip, stop, s.done() and not start)


def job_phase(keys: list[TaskKey], states: dict[TaskKey, Phase]) -> Phase:
    return job_state(Counter(states.get(k, Phase.PENDING) for k in keys), len(keys))


def run_all(workflow: Workflow, outcome: dict[str, Phase] | None = None) -> list[list[TaskKey]]:
    """Drive the workflow to its end: every started task ends as `outcome` says (FINISHED by
    default), services become READY when started. Returns the waves of starts."""
    outcome = outcome or {}
    states: dict[TaskKey, Phase] = {}
    waves = []
    for _ in range(1000):
        d = decide(workflow, states)
        for name in d.skip:
            states[TaskKey(name, 0)] = Phase.SKIPPED
        for name in d.stop:
            states[TaskKey(name, 0)] = Phase.CANCELLED
        if d.done:
            return waves
        if d.start:
            waves.append(sorted(d.start))
        for key in d.start:
            service = key.name in workflow.services
            states[key] = Phase.READY if service else outcome.get(key.name, Phase.FINISHED)
        if not d.start and not d.skip and not d.stop:
            raise AssertionError(f"stuck: {states}")
    raise AssertionError("did not end")


def names(wave: list[TaskKey]) -> list[str]:
    return sorted({k.name for k in wave})


def test_fan_out_and_fan_in() -> None:
    w = wf(f"""
        jobs:
          split: {{{IMAGE}}}
          a: {{{IMAGE}, depends-on: [{{name: split}}]}}
          b: {{{IMAGE}, depends-on: [{{name: split}}]}}
          merge: {{{IMAGE}, depends-on: [{{name: a}}, {{name: b}}]}}
    """)
    assert [names(w_) for w_ in run_all(w)] == [["split"], ["a", "b"], ["merge"]]


def test_task_array_concurrency_and_task_ids() -> None:
    w = wf(f"""
        jobs:
          arr: {{{IMAGE}, task-array: {{start: 1, end: 5, concurrency: 2}}}}
    """)
    states: dict[TaskKey, Phase] = {}
    first = decide(w, states).start
    assert first == [TaskKey("arr", 1), TaskKey("arr", 2)]
    states.update(dict.fromkeys(first, Phase.RUNNING))
    assert decide(w, states).start == []  # two running: the limit
    states[TaskKey("arr", 1)] = Phase.FINISHED
    assert decide(w, states).start == [TaskKey("arr", 3)]
    assert [len(wave) for wave in run_all(w)] == [2, 2, 1]


def test_a_failed_task_of_an_array_lets_the_others_run_then_fails_the_job() -> None:
    w = wf(f"""
        jobs:
          arr: {{{IMAGE}, task-array: {{start: 1, end: 4, concurrency: 2}}}}
          after: {{{IMAGE}, depends-on: [{{name: arr}}]}}
    """)
    states = {TaskKey("arr", 1): Phase.FAILED, TaskKey("arr", 2): Phase.RUNNING}
    d = decide(w, states)
    assert d.start == [TaskKey("arr", 3)]  # the array goes on
    assert d.skip == {}  # and what waits on it waits for all of it
    assert job_phase([TaskKey("arr", i) for i in range(1, 5)], states) is Phase.RUNNING
    states.update({TaskKey("arr", i): Phase.FINISHED for i in (2, 3, 4)})
    assert job_phase([TaskKey("arr", i) for i in range(1, 5)], states) is Phase.FAILED
    assert decide(w, states).skip == {"after": "dependency 'arr' failed"}


def test_a_failure_skips_dependents_but_not_independent_branches() -> None:
    w = wf(f"""
        jobs:
          bad: {{{IMAGE}}}
          after-bad: {{{IMAGE}, depends-on: [{{name: bad}}]}}
          after-after: {{{IMAGE}, depends-on: [{{name: after-bad}}]}}
          good: {{{IMAGE}}}
          after-good: {{{IMAGE}, depends-on: [{{name: good}}]}}
    """)
    states = {TaskKey("bad"): Phase.FAILED, TaskKey("good"): Phase.FINISHED}
    d = decide(w, states)
    assert d.skip == {
        "after-bad": "dependency 'bad' failed",
        "after-after": "dependency 'after-bad' skipped",
    }
    assert d.start == [TaskKey("after-good")]
    assert [names(x) for x in run_all(w, {"bad": Phase.FAILED})] == [
        ["bad", "good"],
        ["after-good"],
    ]


def test_a_job_waits_for_a_ready_service_which_stops_when_unneeded() -> None:
    w = wf(f"""
        services:
          db:
            {IMAGE}
            readiness-probe: {{tcp-socket: {{port: 5432}}}}
        jobs:
          load: {{{IMAGE}, depends-on: [{{name: db, status: RUNNING}}]}}
    """)
    states: dict[TaskKey, Phase] = {}
    assert decide(w, states).start == [TaskKey("db")]
    states[TaskKey("db")] = Phase.RUNNING  # started, probe not yet passed
    assert decide(w, states).start == []
    states[TaskKey("db")] = Phase.READY
    assert decide(w, states).start == [TaskKey("load")]
    states[TaskKey("load")] = Phase.FINISHED
    d = decide(w, states)
    assert d.stop == ["db"]
    assert d.done


def test_a_persisting_service_keeps_the_run_going() -> None:
    w = wf(f"""
        services:
          ui: {{{IMAGE}, persist: true}}
        jobs:
          prep: {{{IMAGE}}}
    """)
    states = {TaskKey("ui"): Phase.READY, TaskKey("prep"): Phase.FINISHED}
    d = decide(w, states)
    assert not d.done
    assert d.stop == []
    states[TaskKey("ui")] = Phase.CANCELLED
    assert decide(w, states).done


def test_a_service_nothing_needs_never_starts() -> None:
    w = wf(f"""
        services:
          idle: {{{IMAGE}}}
        jobs:
          work: {{{IMAGE}}}
    """)
    assert run_all(w) == [[TaskKey("work")]]


def test_the_corpus_workflows_run_to_their_end() -> None:
    from tests.conftest import example_files

    for path in example_files():
        workflow = load_text(path.read_text(), str(path)).unwrap()
        waves = run_all(workflow)
        started = {k.name for wave in waves for k in wave}
        assert started == set(workflow.jobs), path.name


def _replay(workflow: Workflow, seed: int) -> None:
    """Drive `workflow` with random outcomes (failures, retries, services that stop), and at
    every move compare the scheduler kept up to date with one built afresh from the states."""
    rng = random.Random(seed)
    live = Scheduler(workflow)
    states: dict[TaskKey, Phase] = {}

    def move(key: TaskKey, to: Phase) -> None:
        states[key] = to
        live.moved(key, to)
        fresh = Scheduler(workflow, states)
        assert {n: live.job(n) for n in workflow.containers} == {
            n: fresh.job(n) for n in workflow.containers
        }
        assert live.ready == fresh.ready or set(live.ready) == set(fresh.ready)
        for name in live.ready:
            assert live.startable(name) == fresh.startable(name)
        if not fresh.skip:  # (live handed out its skips already; they are being applied)
            assert live.done() == fresh.done()

    running: list[TaskKey] = []
    for _ in range(5000):
        d = live.decide()
        for name in d.skip:
            for key in tasks_of(workflow.containers[name]):
                if live.state(key) is Phase.PENDING:
                    move(key, Phase.SKIPPED)
        for name in d.stop:
            if live.state(TaskKey(name)) in (Phase.STARTING, Phase.RUNNING, Phase.READY):
                move(TaskKey(name), Phase.FINISHED)
                running = [k for k in running if k.name != name]
        if d.skip or d.stop:
            continue
        starts = [k for name in live.decide().ready for k in live.startable(name)]
        for key in starts[: rng.randint(1, 4)]:
            move(key, Phase.STARTING)
            running.append(key)
        if not running:
            assert live.done(), states
            return
        key = running.pop(rng.randrange(len(running)))
        if key.name in workflow.services:
            move(key, Phase.RUNNING)
            move(key, Phase.READY)
            continue
        move(key, Phase.RUNNING)
        move(key, rng.choice([Phase.FINISHED] * 6 + [Phase.FAILED, Phase.PENDING]))
    raise AssertionError("did not end")


def test_kept_up_to_date_it_decides_as_one_built_afresh() -> None:
    w = wf(f"""
        services:
          db: {{{IMAGE}, readiness-probe: {{tcp-socket: {{port: 5432}}}}}}
          cache: {{{IMAGE}}}
        jobs:
          split: {{{IMAGE}, task-array: {{start: 1, end: 12, concurrency: 3}}}}
          a: {{{IMAGE}, depends-on: [{{name: split}}, {{name: db, status: RUNNING}}]}}
          b: {{{IMAGE}, depends-on: [{{name: split}}], task-array: {{start: 0, end: 5}}}}
          c: {{{IMAGE}, depends-on: [{{name: cache, status: RUNNING}}]}}
          merge: {{{IMAGE}, depends-on: [{{name: a}}, {{name: b}}, {{name: c}}]}}
          alone: {{{IMAGE}}}
    """)
    for seed in range(40):
        _replay(w, seed)


def test_a_move_reviews_only_its_job_and_what_depends_on_it(monkeypatch: Any) -> None:
    body = "".join(
        f"  j{i}: {{{IMAGE}, depends-on: [{{name: big}}]}}\n" if i % 2 else f"  j{i}: {{{IMAGE}}}\n"
        for i in range(200)
    )
    w = wf(f"jobs:\n  big: {{{IMAGE}, task-array: {{start: 1, end: 5000}}}}\n{body}")
    s = Scheduler(w)
    reviewed: list[str] = []
    original = Scheduler._review
    monkeypatch.setattr(
        Scheduler, "_review", lambda self, name: (reviewed.append(name), original(self, name))
    )
    s.moved(TaskKey("big", 1), Phase.STARTING)
    assert len(reviewed) == 1 + 100  # big went PENDING > RUNNING: it, and its dependents
    reviewed.clear()
    s.moved(TaskKey("big", 2), Phase.STARTING)
    assert reviewed == ["big"]  # a move that changes no job's state: that job only
    reviewed.clear()
    s.moved(TaskKey("j0"), Phase.STARTING)
    s.moved(TaskKey("j0"), Phase.FINISHED)
    assert reviewed == ["j0", "j0"]  # nothing depends on it
    reviewed.clear()
    for i in range(1, 5001):
        s.moved(TaskKey("big", i), Phase.FINISHED)
    assert len(reviewed) == 5000 + 100  # each move its own job; the last one its 100 dependents
    assert len(s.decide().ready) == 199  # every job but j0, which ended
