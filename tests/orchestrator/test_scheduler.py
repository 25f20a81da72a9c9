"""Scheduling decisions on real workflows, step by step, as the engine will ask for them."""

from __future__ import annotations

import textwrap

from orchestrator.fuzzfile import Workflow, load_text
from orchestrator.scheduler import Phase, TaskKey, decide, job_phase

IMAGE = "image: {uri: docker://busybox:1.36}"


def wf(body: str) -> Workflow:
    return load_text("version: v4\n" + textwrap.dedent(body), "wf.yaml").unwrap()


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
