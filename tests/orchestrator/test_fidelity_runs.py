"""Fuzzfile fields that Squall honours, shown by whole runs on the local site (real agents,
crun, busybox from the local registry, SQLite): service endpoints and FB_ENDPOINT_*,
`network.host`, a service's time limit, a volume's size, and readiness-probe timings.
busybox's `wget` crashes in containers here; its `nc` works."""

from __future__ import annotations

from sqlalchemy import select

from orchestrator.engine import Engine
from orchestrator.store import Attempt, Event, Job, RunState, Task, TaskState
from tests.orchestrator.test_engine import IMAGE, fuzzfile

# GET / from the endpoint whose URL is in $1 (http://HOST:PORT/), with nc, a few tries
FETCH = r"""
fetch() {
  hp=${1#http://}; hp=${hp%/}
  for i in 1 2 3 4 5 6 7 8 9 10; do
    printf 'GET /index.html HTTP/1.0\r\n\r\n' | nc -w 5 "${hp%:*}" "${hp#*:}" && return 0
    sleep 0.3
  done
  return 1
}
"""


def _log(engine: Engine, run_id: str, name: str) -> str:
    return (engine.data_dir / "runs" / run_id / "logs" / name / "0.1.log").read_text()


def _attempts(engine: Engine, run_id: str, name: str) -> list[Attempt]:
    with engine.store.session() as s:
        return list(
            s.scalars(
                select(Attempt)
                .join(Attempt.task)
                .join(Task.job)
                .where(Job.run_id == run_id, Job.name == name)
            )
        )


def test_endpoints_reach_the_service_its_dependents_and_itself(engine: Engine) -> None:
    """FB_ENDPOINT_URL_<NAME> and FB_ENDPOINT_PATH_<NAME> in the service and in what depends
    on it, not elsewhere; the URL works from both (`network.host: true`: reached by name,
    itself included); an exec probe with its timings gates the dependent job."""
    script = FETCH.replace("\n", "\n" + " " * 14)  # the indentation of a script line
    outcome = engine.run(
        "user/endpoints",
        fuzzfile(f"""
        services:
          web:
            {IMAGE}
            script: |
              #!/bin/sh
              {script}
              mkdir -p /srv && echo "served by web" > /srv/index.html
              httpd -p 18080 -h /srv
              echo "self $FB_ENDPOINT_URL_SITE $FB_ENDPOINT_PATH_SITE"
              fetch "$FB_ENDPOINT_URL_SITE" > /tmp/self.txt
              cat /tmp/self.txt
              exec sleep 600
            network:
              host: true
              ports: [{{name: http, port: 18080}}]
              endpoints:
                - {{name: site, port-name: http, protocol: http, type: path, scope: user}}
            readiness-probe:
              exec: {{command: [/bin/sh, -c, "grep -q 'served by web' /tmp/self.txt"]}}
              initial-delay-seconds: 1
              period-seconds: 1
              success-threshold: 2
        jobs:
          client:
            {IMAGE}
            script: |
              #!/bin/sh
              {script}
              echo "url=$FB_ENDPOINT_URL_SITE path=$FB_ENDPOINT_PATH_SITE"
              fetch "$FB_ENDPOINT_URL_SITE"
            depends-on: [{{name: web, status: RUNNING}}]
          bystander:
            {IMAGE}
            script: |
              #!/bin/sh
              echo "url=${{FB_ENDPOINT_URL_SITE-unset}}"
    """),
    )
    assert outcome.state is RunState.FINISHED, outcome.reason
    client = _log(engine, outcome.run_id, "client")
    assert "url=http://web.svc:18080/ path=/\n" in client
    assert "served by web" in client
    web = _log(engine, outcome.run_id, "web")
    assert "self http://web.svc:18080/ /\n" in web
    assert "served by web" in web  # it reached itself at its own endpoint
    assert _log(engine, outcome.run_id, "bystander") == "url=unset\n"
    # ready only after the initial delay and two passing probes a period apart
    [web_attempt] = _attempts(engine, outcome.run_id, "web")
    assert web_attempt.started_at is not None
    with engine.store.session() as s:
        ready = s.scalars(
            select(Event.at).where(
                Event.run_id == outcome.run_id, Event.subject == "web", Event.message == "ready"
            )
        ).one()
    assert (ready - web_attempt.started_at).total_seconds() >= 2.0
    [client_attempt] = _attempts(engine, outcome.run_id, "client")
    assert client_attempt.started_at >= ready


def test_a_service_is_stopped_and_failed_at_its_time_limit(engine: Engine) -> None:
    """`policy.timeout.execute` on a service: before, a persisting service ran for as long
    as its command did (here a minute) and the run finished."""
    outcome = engine.run(
        "user/service-timeout",
        fuzzfile(f"""
        services:
          slow:
            {IMAGE}
            command: [sleep, "60"]
            persist: true
            policy: {{timeout: {{execute: 2s}}}}
        jobs:
          quick:
            {IMAGE}
            command: [/bin/true]
    """),
    )
    assert outcome.state is RunState.FAILED
    assert outcome.reason == "failed: slow"
    [attempt] = _attempts(engine, outcome.run_id, "slow")
    assert attempt.state is TaskState.FAILED
    assert "time" in attempt.message
    assert attempt.finished_at is not None
    assert (attempt.finished_at - attempt.started_at).total_seconds() < 30


def test_a_volume_gets_its_size_or_the_run_fails_before_any_job(engine: Engine) -> None:
    """`size` on a volume: room for it where the volume is made, or a clear reason at
    STAGING. Before, a volume asking for an exbibyte ran like any other."""

    def workflow(size: str) -> str:
        return fuzzfile(f"""
            volumes:
              scratch: {{size: {size}}}
            jobs:
              use:
                {IMAGE}
                command: [/bin/sh, -c, "echo x > /scratch/f"]
                mounts: {{/scratch: {{volume: scratch}}}}
        """)

    assert engine.run("user/small", workflow("1MiB")).state is RunState.FINISHED
    huge = engine.run("user/huge", workflow("1EiB"))
    assert huge.state is RunState.FAILED
    assert "volume 'scratch' (its `size`) asks for 1EiB, and the volume storage" in huge.reason
    assert _attempts(engine, huge.run_id, "use") == []  # no job ran
