"""The workflows under examples/ run end to end on the local site: real agent processes,
crun containers, images from a registry served here, an HTTPS server for ingress and moto's
S3 server for egress (moto stands in for AWS; everything else is the real thing)."""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.engine import Engine
from orchestrator.store import Attempt, Event, Job, RunState, Task, TaskState
from tests.orchestrator.conftest import MakeEngine
from tests.orchestrator.servers import FileServer, S3Server

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BOOK = b"".join(
    f"line {i}: the quick brown fox jumps over the lazy dog\n".encode() for i in range(4000)
)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[FileServer]:
    server = FileServer(tmp_path, {"pg84.txt": BOOK})
    yield server
    server.stop()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    server = S3Server(tmp_path)
    server.client().create_bucket(Bucket="squall-results")
    yield server
    server.stop()


def events(engine: Engine, run_id: str) -> list[str]:
    with engine.store.session() as s:
        return list(
            s.scalars(select(Event.message).where(Event.run_id == run_id).order_by(Event.id))
        )


def test_pipeline_fans_out_and_in_with_https_ingress_and_s3_egress(
    make_engine: MakeEngine, web: FileServer, s3: S3Server, tmp_path: Path
) -> None:
    engine = make_engine(ca_file=web.ca_file)
    engine.secrets.put(
        "secret://user/RESULTS_S3", getpass.getuser(), json.dumps(s3.credentials).encode()
    )
    text = (EXAMPLES / "pipeline.yaml").read_text()
    text = text.replace("https://www.gutenberg.org/cache/epub/84/pg84.txt", f"{web.url}/pg84.txt")
    outcome = engine.run("user/pipeline", text)
    assert outcome.state is RunState.FINISHED, (outcome.reason, events(engine, outcome.run_id))

    counts = s3.client().get_object(Bucket="squall-results", Key="pipeline/counts.txt")
    top = counts["Body"].read().decode().splitlines()
    # 4000 lines: "the" twice in each, the other words once
    assert top[0] == "8000 the"
    assert {line.split()[1] for line in top if line.split()[0] == "4000"} == {
        "line",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
    }
    # the eight tasks ran, four at a time at most, and the volume is gone with the run
    with engine.store.session() as s:
        rows = s.execute(
            select(Task.index, Task.state)
            .join(Task.job)
            .where(Job.run_id == outcome.run_id, Job.name == "count")
        ).all()
    assert sorted(rows) == [(i, TaskState.FINISHED) for i in range(8)]
    assert not (tmp_path / "data" / "runs" / outcome.run_id / "volumes").exists() or not any(
        (tmp_path / "data" / "runs" / outcome.run_id / "volumes").iterdir()
    )
    messages = events(engine, outcome.run_id)
    assert any("pg84.txt: done" in m for m in messages)
    assert any("pipeline/counts.txt: done" in m for m in messages)

    # a second run takes the book from the ingress cache
    again = engine.run("user/pipeline-2", text)
    assert again.state is RunState.FINISHED, again.reason
    assert any("(from the cache)" in m for m in events(engine, again.run_id))


def _max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_a_200_task_array_runs_at_most_8_at_a_time(make_engine: MakeEngine) -> None:
    engine = make_engine(nodes=6)  # 12 slots: the array's own limit must be what holds it
    outcome = engine.run("user/array", (EXAMPLES / "array.yaml").read_text())
    assert outcome.state is RunState.FINISHED, outcome.reason
    with engine.store.session() as s:
        spans = s.execute(
            select(Attempt.started_at, Attempt.finished_at)
            .join(Attempt.task)
            .join(Task.job)
            .where(Job.run_id == outcome.run_id, Job.name == "square")
        ).all()
    assert len(spans) == 200
    peak = _max_overlap([(a, b) for a, b in spans])
    assert 2 < peak <= 8
    log = (engine.data_dir / "runs" / outcome.run_id / "logs" / "check" / "0.1.log").read_text()
    assert log.strip() == f"sum of squares 1..200: {sum(i * i for i in range(1, 201))}"


def test_a_job_waits_for_a_service_to_be_ready_and_the_service_then_stops(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine()
    outcome = engine.run("user/service", (EXAMPLES / "service.yaml").read_text())
    assert outcome.state is RunState.FINISHED, (outcome.reason, events(engine, outcome.run_id))
    log = (engine.data_dir / "runs" / outcome.run_id / "logs" / "client" / "0.1.log").read_text()
    assert log == "served by web\n"
    with engine.store.session() as s:
        jobs = dict(
            s.execute(select(Job.name, Job.state).where(Job.run_id == outcome.run_id)).all()
        )
        [web_attempt] = s.scalars(
            select(Attempt)
            .join(Attempt.task)
            .join(Task.job)
            .where(Job.run_id == outcome.run_id, Job.name == "web")
        ).all()
        [client_attempt] = s.scalars(
            select(Attempt)
            .join(Attempt.task)
            .join(Task.job)
            .where(Job.run_id == outcome.run_id, Job.name == "client")
        ).all()
    assert jobs == {"web": TaskState.FINISHED, "client": TaskState.FINISHED}
    assert web_attempt.message == "stopped"  # stopped by the engine once the client was done
    messages = events(engine, outcome.run_id)
    assert "ready" in messages
    assert messages.index("ready") < next(
        i for i, m in enumerate(messages) if m.startswith("attempt 1") and "exit 0" in m
    )
    assert client_attempt.started_at > web_attempt.started_at


def test_a_failed_egress_fails_the_run_keeps_the_data_and_can_be_retried(
    make_engine: MakeEngine, s3: S3Server
) -> None:
    engine = make_engine()
    engine.secrets.put("secret://user/S3", getpass.getuser(), json.dumps(s3.credentials).encode())
    text = """version: v4
volumes:
  out:
    use: ephemeral
    egress:
      - source: {uri: file://result.txt}
        destination: {uri: s3://late-bucket/result.txt, secret: secret://user/S3}
        policy: {retry: {attempts: 1}}
jobs:
  make:
    image: {uri: docker://busybox:1.36}
    command: [/bin/sh, -c, "echo precious > /out/result.txt"]
    mounts: {/out: {volume: out}}
"""
    outcome = engine.run("user/egress", text)
    assert outcome.state is RunState.FAILED
    assert outcome.reason.startswith("egress failed: s3://late-bucket/result.txt")
    assert "kept until the egress succeeds" in outcome.reason
    kept = engine.data_dir / "runs" / outcome.run_id / "volumes" / "out" / "result.txt"
    assert kept.read_text() == "precious\n"  # nothing lost

    s3.client().create_bucket(Bucket="late-bucket")
    assert engine.retry_egress("user/egress") == []
    body = s3.client().get_object(Bucket="late-bucket", Key="result.txt")["Body"].read()
    assert body == b"precious\n"
    assert not kept.exists()  # released once everything is out


def test_cancelling_a_run_stops_its_tasks_and_its_cluster(make_engine: MakeEngine) -> None:
    import threading

    from orchestrator.engine import request_cancel

    engine = make_engine()
    run_id = engine.submit(
        "user/cancel",
        "version: v4\njobs:\n  wait:\n    image: {uri: docker://busybox:1.36}\n"
        "    command: [sleep, '300']\n",
    )
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(engine.execute(run_id)))
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with engine.store.session() as s:
            if (
                s.scalars(select(Task.state).join(Task.job).where(Job.run_id == run_id)).one()
                is TaskState.RUNNING
            ):
                break
        time.sleep(0.1)
    request_cancel(engine.store, "user/cancel")
    worker.join(60)
    [outcome] = result
    assert outcome.state is RunState.CANCELLED  # type: ignore[attr-defined]
    assert outcome.reason == "cancelled by request"  # type: ignore[attr-defined]
    with engine.store.session() as s:
        [attempt] = s.scalars(
            select(Attempt).join(Attempt.task).join(Task.job).where(Job.run_id == run_id)
        ).all()
        assert attempt.state is TaskState.CANCELLED
        assert attempt.message == "cancelled"
        assert s.scalars(select(Job.state).where(Job.run_id == run_id)).one() is TaskState.CANCELLED
