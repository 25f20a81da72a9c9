"""Secret values masked in what Squall writes: the masker on its own (values split across
chunks, short values), and a real local run (agents, crun, SQLite) whose job prints its
secret: the kept logs, the live logs, the events show `***`, and nothing under the test's
folders holds the value once the run ended."""

from __future__ import annotations

import getpass
import random
import textwrap
import threading
import time
from pathlib import Path

from sqlalchemy import select

from orchestrator import redaction
from orchestrator.access import RunAccess
from orchestrator.engine import Engine, RunOutcome
from orchestrator.redaction import MASK, Redactor
from orchestrator.runloop import log_path
from orchestrator.scheduler import TaskKey
from orchestrator.store import Attempt, Event, Job, Run, RunState, Task, TaskState

IMAGE = "image: {uri: docker://busybox:1.36}"
VALUE = "sq-" + "".join(random.choices("abcdefghjkmnpqrstuvwxyz23456789", k=20))


# ---- the masker ----------------------------------------------------------------------------


def test_values_are_masked_in_text_and_bytes() -> None:
    r = Redactor(["hunter22", "s3cret-token", ""])
    assert r.text("pw=hunter22 and s3cret-token.") == "pw=*** and ***."
    assert r.data(b"hunter22hunter22") == b"******"
    assert r.text("nothing here") == "nothing here"
    assert Redactor().text("hunter22") == "hunter22"  # masks nothing
    assert not Redactor(["abc"])


def test_short_values_are_not_masked() -> None:
    r = Redactor(["abc", "1", "abcd"])
    assert r.values == ("abcd",)
    assert r.text("abc 1 abcd") == "abc 1 ***"


def test_the_longest_of_overlapping_values_is_masked() -> None:
    r = Redactor(["pass", "password123"])
    assert r.text("password123 pass") == "*** ***"


def test_unicode_values_are_masked_as_bytes_too() -> None:
    r = Redactor(["clé-secrète"])
    assert r.data("la clé-secrète!".encode()) == b"la ***!"


def stream(r: Redactor, chunks: list[bytes]) -> bytes:
    masker = r.masker()
    return b"".join(masker.feed(c) for c in chunks) + masker.end()


def test_a_value_split_across_chunks_is_masked_wherever_it_is_split() -> None:
    r = Redactor(["hunter22", "s3cret-token"])
    text = b"a hunter22 b s3cret-token c hunter22"
    expected = b"a *** b *** c ***"
    for cut in range(len(text) + 1):
        assert stream(r, [text[:cut], text[cut:]]) == expected, cut
    for a in range(len(text) + 1):
        for b in range(a, len(text) + 1):
            assert stream(r, [text[:a], text[a:b], text[b:]]) == expected, (a, b)
    assert stream(r, [bytes([c]) for c in text]) == expected  # a byte at a time


def test_streams_in_random_chunks_read_as_the_whole() -> None:
    rng = random.Random(18)
    values = ["abcd", "abcdefgh", "xyzzy-42", "zz" * 10]
    r = Redactor(values)
    for _ in range(300):
        parts = [rng.choice([*values, "a", "b", "abc", "x", "z", "\n"]) for _ in range(40)]
        text = "".join(parts).encode()
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, 8)))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream(r, chunks) == r.data(text)


def test_a_masker_holds_back_no_more_than_a_value_needs() -> None:
    masker = Redactor(["hunter22"]).masker()
    assert masker.feed(b"0123456789hunt") == b"0123456"  # "789hunt" may begin a value
    assert masker.feed(b"er22 and on") == b"789***"  # " and on" may still begin one
    assert masker.end() == b" and on"
    assert Redactor().masker().feed(b"anything") == b"anything"  # nothing to hold back


def test_the_registry_scrubs_only_the_runs_it_knows() -> None:
    redaction.register("run-a", Redactor(["hunter22"]))
    try:
        assert redaction.scrub("run-a", "it was hunter22") == "it was ***"
        assert redaction.scrub("run-b", "it was hunter22") == "it was hunter22"
    finally:
        redaction.forget("run-a")
    assert redaction.scrub("run-a", "it was hunter22") == "it was hunter22"


# ---- a real run ----------------------------------------------------------------------------


def fuzzfile(body: str) -> str:
    return "version: v4\n" + textwrap.dedent(body)


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes())


def test_a_secret_a_job_prints_is_masked_in_its_logs_and_nowhere_on_disk(
    engine: Engine, tmp_path: Path
) -> None:
    engine.secrets.put("secret://user/TOKEN", getpass.getuser(), VALUE.encode())
    # `short` prints it in a few bytes (its output comes in the Wait reply); `long` prints
    # 100 KiB with the value all along (its output is streamed off the agent in chunks);
    # `fails` prints it and fails
    outcome = engine.run(
        "user/redacted",
        fuzzfile(f"""
        jobs:
          short:
            {IMAGE}
            command: [/bin/sh, -c, 'echo "token=$TOKEN"; echo "$TOKEN" >&2']
            env: [TOKEN=secret://user/TOKEN]
          long:
            {IMAGE}
            command:
              - /bin/sh
              - -c
              - 'i=0; while [ $i -lt 3000 ]; do echo "$i $TOKEN"; i=$((i+1)); done'
            env: [TOKEN=secret://user/TOKEN]
          fails:
            {IMAGE}
            command: [/bin/sh, -c, 'echo "$TOKEN"; exit 3']
            env: [TOKEN=secret://user/TOKEN]
    """),
    )
    assert outcome.state is RunState.FAILED, outcome.reason
    data = engine.data_dir
    short = log_path(data, outcome.run_id, TaskKey("short", 0), 1).read_text()
    assert sorted(short.splitlines()) == sorted([f"token={MASK}", MASK])
    long = log_path(data, outcome.run_id, TaskKey("long", 0), 1).read_text().splitlines()
    assert long == [f"{i} {MASK}" for i in range(3000)]
    fails = log_path(data, outcome.run_id, TaskKey("fails", 0), 1).read_text()
    assert fails == f"{MASK}\n"
    # what anyone reads through the access layer (another process: no registry there)
    access = RunAccess(engine.store, data)
    assert b"".join(access.logs("user/redacted", "short")).count(MASK.encode()) == 2
    with engine.store.session() as s:
        messages = s.scalars(select(Event.message).where(Event.run_id == outcome.run_id)).all()
        assert messages
        assert not any(VALUE in m for m in messages)
    assert redaction.scrub(outcome.run_id, VALUE) == VALUE  # forgotten once the run ended
    # nothing under the test's folders (the data directory, the store, the agents' folders
    # and their log store) holds the value, as text or within a record
    assert files_holding(tmp_path, VALUE.encode()) == []


def test_live_logs_are_masked_for_a_reader_in_another_process(
    engine: Engine, tmp_path: Path
) -> None:
    engine.secrets.put("secret://user/TOKEN", getpass.getuser(), VALUE.encode())
    name = "user/live-redacted"
    run_id = engine.submit(
        name,
        fuzzfile(f"""
        jobs:
          talk:
            {IMAGE}
            command: [/bin/sh, -c, 'echo "first $TOKEN"; sleep 3; echo "then $TOKEN"']
            env: [TOKEN=secret://user/TOKEN]
    """),
    )
    outcome: list[RunOutcome] = []
    runner = threading.Thread(target=lambda: outcome.append(engine.execute(run_id)))
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with engine.store.session() as s:
                running = s.scalars(
                    select(Attempt.agent_task_id)
                    .join(Task, Attempt.task_id == Task.id)
                    .join(Job, Task.job_id == Job.id)
                    .where(Job.run_id == run_id, Task.state == TaskState.RUNNING)
                ).first()
            if running:
                break
            time.sleep(0.1)
        assert running, "the job never ran"
        # a reader that is not the engine (a fresh RunAccess builds its own SecretStore)
        live = b"".join(RunAccess(engine.store, engine.data_dir).logs(name, "talk", follow=True))
    finally:
        runner.join(timeout=120)
    assert outcome, "the run did not end"
    assert outcome[0].state is RunState.FINISHED, outcome
    assert live.decode().splitlines() == [f"first {MASK}", f"then {MASK}"]
    with engine.store.session() as s:
        assert s.get_one(Run, run_id).state is RunState.FINISHED
    assert files_holding(tmp_path, VALUE.encode()) == []
