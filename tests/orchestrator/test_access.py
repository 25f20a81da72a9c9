"""Identity and access over the real control-plane server, with TLS on 127.0.0.1: an admin and
two users (alice in group chem, bob in group bio), a policy that grants them different verbs,
and real runs on this machine behind it (agents, crun containers, an HTTP server in a job).

Each verb is tried by someone allowed and someone denied; tokens expire, are revoked and stop
working with their user; secrets are scoped to their holder, encrypted at rest and masked in
what the system writes; every call, allowed or denied, is in the audit log."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.squall.v1 import control_pb2 as pb
from cli.backends import RemoteBackend
from cli.contexts import Context
from cli.main import app
from orchestrator import identity
from orchestrator.api import ControlServer, serve
from orchestrator.api.audit import Throttle
from orchestrator.api.gate import STREAM_RECHECK_S
from orchestrator.api.iam import parse_access_policy
from orchestrator.errors import (
    Category,
    InvalidInput,
    NotFound,
    PermissionDenied,
    SquallError,
    Unauthenticated,
)
from orchestrator.local_site import LocalSettings, local_engine
from orchestrator.placing import Placer
from tests.substrate.registry import Registry, self_signed_certificate

ADMIN_TOKEN = "admin-token-" + "x" * 20
POLICY = """\
grants:
  - to: [group:chem]
    verbs: [start, status, log, cancel, exec, port-forward, egress, schedule, secret]
    workflows: ["chem/*"]
  - to: [group:chem]
    verbs: [start, status]
    workflows: ["cloud/*"]
    sites: [aws]
  - to: [group:bio]
    verbs: [start, status, log, cancel, schedule, secret]
    workflows: ["bio/*"]
  - to: [group:bio]
    verbs: [status, log]
    workflows: ["chem/*"]
    runs: any
  - to: ["*"]
    verbs: [secret]
"""
NOTEBOOK = """\
version: v4
jobs:
  notebook:
    image: {uri: docker://busybox:1.36}
    script: |
      #!/bin/sh
      mkdir -p /srv
      echo "hello through the agent" > /srv/index.html
      httpd -p 8080 -h /srv
      echo "serving on port 8080"
      while [ ! -e /tmp/done ]; do sleep 0.2; done
    network: {isolated: true}
    resource: {cpu: {cores: 1}, memory: {size: 64MiB}}
"""
QUICK = """\
version: v4
jobs:
  quick:
    image: {uri: docker://busybox:1.36}
    command: [/bin/true]
    resource: {cpu: {cores: 1}, memory: {size: 32MiB}}
"""
WITH_EGRESS = """\
version: v4
volumes:
  out:
    use: ephemeral
    egress:
      - {source: {uri: file://r.txt}, destination: {uri: 'file:///tmp/r.txt'}}
jobs:
  write:
    image: {uri: docker://busybox:1.36}
    command: [/bin/sh, -c, 'echo r > /out/r.txt']
    mounts: {/out: {volume: out}}
"""
USES_SECRETS = """\
version: v4
jobs:
  show:
    image: {uri: docker://busybox:1.36}
    command: [/bin/sh, -c, 'echo "key=$KEY"; echo "again $KEY" >&2']
    env:
      - KEY=secret://user/API_KEY
    resource: {cpu: {cores: 1}, memory: {size: 32MiB}}
"""
# environment secrets are user-scoped (as Fuzzball's); images and transfers take the others
USES_GROUP_SECRET = """\
version: v4
jobs:
  pull:
    image: {uri: docker://busybox:1.36, secret: secret://group/SHARED}
    command: [/bin/true]
"""
VALUES = {
    "alice": b"alice-s3cr3t-value",
    "bob": b"bob-0ther-value",
    "chem": b'{"username": "chem", "password": "chem-shared-value"}',
    "org": b"org-wide-value",
}


@dataclass
class World:
    address: str
    ca: Path
    data: Path
    servicer: ControlServer
    admin: RemoteBackend
    alice: RemoteBackend
    bob: RemoteBackend
    as_: Callable[[str], RemoteBackend]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[World]:
    work = tmp_path_factory.mktemp("access")
    cert, key = self_signed_certificate(work, "server")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SQUALL_DATA_DIR", str(work / "data"))
        for name in ("SQUALL_STORE_URL", "SQUALL_SITES", "SQUALL_POLICY", "SQUALL_CATALOG"):
            mp.delenv(name, raising=False)
        settings = LocalSettings(
            search_registries=[registry.address],
            insecure_registries=[registry.address],
            egress_dirs=[work / "out"],
        )
        server, port, servicer = serve(
            local_engine(settings),
            "127.0.0.1:0",
            ADMIN_TOKEN,
            tls=(cert.read_bytes(), key.read_bytes()),
            workers=16,
            policy=parse_access_policy(POLICY, "the test's policy"),
        )
        address = f"127.0.0.1:{port}"

        def as_(token: str) -> RemoteBackend:
            return RemoteBackend(Context("t", address, token, ca_file=str(cert)))

        admin = as_(ADMIN_TOKEN)
        alice = as_(admin.add_user("alice", ["chem"], False, None).text)
        bob = as_(admin.add_user("bob", ["bio"], False, None).text)
        try:
            yield World(address, cert, work / "data", servicer, admin, alice, bob, as_)
        finally:
            servicer.shutdown()
            server.stop(None)


def _denied(call: Callable[[], object], *words: str) -> str:
    with pytest.raises(SquallError) as caught:
        call()
    assert caught.value.category is Category.DENIED, caught.value
    assert isinstance(caught.value, PermissionDenied)
    for word in words:
        assert word in str(caught.value)
    return str(caught.value)


def _wait(what: str, check: Callable[[], object], timeout: float = 120.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _ended(backend: RemoteBackend, name: str) -> str:
    return str(
        _wait(
            f"{name} to end",
            lambda: backend.status(name).finished_at is not None and backend.status(name).state,
        )
    )


def _exec(backend: RemoteBackend, name: str, *command: str) -> tuple[bytes, int]:
    start = pb.ExecStart(name=name, job="notebook", index=0, command=list(command))
    out, code = b"", -1
    for message in backend.exec(iter([pb.ExecInput(start=start)])):
        if message.WhichOneof("output") == "stdout":
            out += message.stdout
        elif message.WhichOneof("output") == "exit_code":
            code = message.exit_code
    return out, code


def _forward(backend: RemoteBackend, name: str, payload: bytes) -> bytes:
    """Send `payload` to port 8080 of the run's notebook job; what comes back."""
    answered = threading.Event()

    def requests() -> Iterator[pb.PortForwardInput]:
        yield pb.PortForwardInput(
            start=pb.PortForwardStart(name=name, job="notebook", index=0, port=8080)
        )
        yield pb.PortForwardInput(data=payload)
        answered.wait(30)

    got = b""
    for message in backend.port_forward(requests()):
        got += message.data
        if b"hello" in got:
            answered.set()
    answered.set()
    return got


def test_each_verb_is_allowed_and_denied_as_the_policy_says(world: World) -> None:
    admin, alice, bob = world.admin, world.alice, world.bob
    # start: alice on chem/*, never bob; the run is the caller's whatever a client says
    run = alice.start("chem/nb-1", NOTEBOOK)
    assert run.owner == "alice"
    _denied(lambda: bob.start("chem/b-1", QUICK), "bob may not start on chem/b-1")
    _wait(
        "the notebook",
        lambda: b"serving" in b"".join(alice.logs("chem/nb-1", "notebook", 0, False)),
    )
    # status and log: bob's group may read chem runs, whoever owns them
    assert bob.status("chem/nb-1").owner == "alice"
    assert b"serving" in b"".join(bob.logs("chem/nb-1", "notebook", 0, False))
    # cancel, exec and port-forward: only alice (and the admin)
    _denied(lambda: bob.cancel("chem/nb-1"), "bob may not cancel on chem/nb-1 (not bob's)")
    _denied(lambda: _exec(bob, "chem/nb-1", "cat", "/srv/index.html"), "may not exec")
    _denied(lambda: _forward(bob, "chem/nb-1", b"GET /index.html HTTP/1.0\r\n\r\n"), "port-forward")
    assert _exec(alice, "chem/nb-1", "cat", "/srv/index.html") == (b"hello through the agent\n", 0)
    page = _forward(alice, "chem/nb-1", b"GET /index.html HTTP/1.0\r\n\r\n")
    assert page.startswith(b"HTTP/1.")
    assert b"hello through the agent" in page
    assert _exec(admin, "chem/nb-1", "echo", "admin was here") == (b"admin was here\n", 0)
    # bob runs on bio/*, but may not write results out (no egress), and alice cannot see it
    bob.start("bio/quick-1", QUICK)
    _denied(lambda: bob.start("bio/out-1", WITH_EGRESS), "bob may not egress on bio/out-1")
    _denied(lambda: alice.status("bio/quick-1"), "alice may not status on bio/quick-1")
    assert _ended(bob, "bio/quick-1") == "FINISHED"
    # lists hold what the caller may see, and nothing else
    assert {r.name for r in alice.runs("*")} == {"chem/nb-1"}
    assert {r.name for r in bob.runs("*")} == {"chem/nb-1", "bio/quick-1"}
    assert {r.name for r in admin.runs("*")} >= {"chem/nb-1", "bio/quick-1"}
    # sites: alice may start cloud/* on aws only, so this machine is not a place for it
    alice.start("cloud/x-1", QUICK)
    assert _ended(alice, "cloud/x-1") == "FAILED"
    assert "federation placed it on aws:" in alice.status("cloud/x-1").reason
    # admin verbs
    _denied(alice.users, "alice may not admin")
    _denied(lambda: alice.audit("", None, 10), "admin")
    _denied(lambda: alice.add_user("mallory", [], True, None), "admin")
    _denied(alice.rotate_key, "admin")
    _denied(lambda: bob.disable_user("alice", True), "admin")
    # the owner ends it; the admin may cancel anyone's
    assert _exec(alice, "chem/nb-1", "touch", "/tmp/done")[1] == 0
    assert _ended(alice, "chem/nb-1") == "FINISHED"
    bob.start("bio/quick-2", NOTEBOOK.replace("notebook", "wait"))
    _denied(lambda: alice.cancel("bio/quick-2"), "alice may not cancel on bio/quick-2")
    assert admin.cancel("bio/quick-2").name == "bio/quick-2"
    assert _ended(bob, "bio/quick-2") == "CANCELLED"


def test_schedules_belong_to_their_owner(world: World) -> None:
    admin, alice, bob = world.admin, world.alice, world.bob
    request = pb.CreateScheduleRequest(name="chem/nightly", fuzzfile=QUICK, cron="0 3 * * *")
    assert alice.create_schedule(request).owner == "alice"
    assert "chem/nightly" not in {s.name for s in bob.schedules()}
    _denied(lambda: bob.pause_schedule("chem/nightly", True), "bob may not schedule")
    _denied(lambda: bob.delete_schedule("chem/nightly"), "(not bob's)")
    bobs = pb.CreateScheduleRequest(name="chem/bobs", fuzzfile=QUICK, cron="0 3 * * *")
    _denied(lambda: bob.create_schedule(bobs), "bob may not schedule on chem/bobs")
    assert alice.pause_schedule("chem/nightly", True).paused
    admin.delete_schedule("chem/nightly")
    with pytest.raises(NotFound):
        alice.schedule("chem/nightly")


def test_tokens_expire_are_revoked_and_die_with_their_user(world: World) -> None:
    admin, alice = world.admin, world.alice
    assert alice.whoami().name == "alice"
    assert list(alice.whoami().groups) == ["chem"]
    laptop = alice.create_token("", None, "laptop")
    assert laptop.token.user == "alice"
    assert laptop.text.startswith("sqt_")
    assert world.as_(laptop.text).whoami().name == "alice"
    mine = {t.id for t in alice.tokens("")}
    assert laptop.token.id in mine
    assert all(t.user == "alice" for t in alice.tokens(""))
    _denied(lambda: alice.tokens("bob"), "alice may not admin")
    _denied(lambda: alice.create_token("bob", None, ""), "admin")
    bobs = {t.id for t in admin.tokens("bob")}
    _denied(lambda: alice.revoke_token(sorted(bobs)[0]), "admin")
    # a user's own tokens live a year at most: longer, or never expiring, takes admin
    _denied(lambda: alice.create_token("", 0, "forever"), "a token that never expires")
    _denied(lambda: alice.create_token("", 400 * 86400.0, "long"), "lives 400 days")
    with pytest.raises(InvalidInput, match="up to 3650 days"):
        admin.create_token("alice", 1e18, "")
    assert admin.create_token("alice", 0, "ci").token.expires_at == ""
    # revoked: it stops at once
    admin.revoke_token(laptop.token.id)
    with pytest.raises(Unauthenticated, match="revoked"):
        world.as_(laptop.text).whoami()
    # expired
    short = alice.create_token("", 1.0, "short")
    time.sleep(1.2)
    with pytest.raises(Unauthenticated, match="expired"):
        world.as_(short.text).runs("*")
    # a disabled user's tokens stop; enabled again, they work
    carol = admin.add_user("carol", ["bio"], False, None)
    admin.disable_user("carol", True)
    with pytest.raises(Unauthenticated, match="disabled"):
        world.as_(carol.text).whoami()
    admin.disable_user("carol", False)
    assert world.as_(carol.text).whoami().name == "carol"
    # none, or one the server never made; the store keeps no token text
    for token in ("", "sqt_0000_" + "y" * 40):
        with pytest.raises(Unauthenticated):
            world.as_(token).whoami()
    stored = (world.data / "squall.db").read_bytes()
    assert carol.text.encode() not in stored
    assert ADMIN_TOKEN.encode() not in stored


def test_secrets_are_scoped_encrypted_and_masked(world: World) -> None:
    admin, alice, bob = world.admin, world.alice, world.bob
    alice.set_secret("secret://user/API_KEY", VALUES["alice"], "")
    bob.set_secret("secret://user/API_KEY", VALUES["bob"], "")
    assert alice.set_secret("secret://group/SHARED", VALUES["chem"], "").holder == "chem"
    _denied(lambda: bob.set_secret("secret://group/SHARED", b"bob's", "chem"), "admin")
    _denied(lambda: alice.set_secret("secret://organization/ORG", b"x", ""), "admin")
    admin.set_secret("secret://organization/ORG", VALUES["org"], "")
    assert {(s.ref, s.holder) for s in alice.secrets(False)} == {
        ("secret://user/API_KEY", "alice"),
        ("secret://group/SHARED", "chem"),
        ("secret://organization/ORG", ""),
    }
    assert {(s.ref, s.holder) for s in bob.secrets(False)} == {
        ("secret://user/API_KEY", "bob"),
        ("secret://organization/ORG", ""),
    }
    _denied(lambda: alice.secrets(True), "admin")
    assert len(admin.secrets(True)) == 4
    # a run resolves secrets for its owner: bob's cannot use chem's, whatever it names
    with pytest.raises(InvalidInput, match="SHARED"):
        bob.start("bio/sec-2", USES_GROUP_SECRET)
    engine = world.servicer.engine
    assert engine.secrets_of("alice").login("secret://group/SHARED") == (
        "chem",
        "chem-shared-value",
    )
    assert engine.secrets_of("bob").get("secret://user/API_KEY") == VALUES["bob"].decode()
    assert engine.secrets_of("bob").get("secret://organization/ORG") == VALUES["org"].decode()
    # alice's run gets hers when its container starts; what the job prints is masked in the
    # log the system keeps
    alice.start("chem/sec-1", USES_SECRETS)
    assert _ended(alice, "chem/sec-1") == "FINISHED", alice.status("chem/sec-1").reason
    log = b"".join(alice.logs("chem/sec-1", "show", 0, False))
    assert sorted(log.splitlines()) == [b"again ***", b"key=***"]
    # no value is anywhere in the data directory, the store included
    values = [*VALUES.values(), b"chem-shared-value"]
    for path in world.data.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for value in values:
                assert value not in data, f"{value!r} is in {path}"


def test_the_audit_log_holds_every_call(world: World) -> None:
    admin = world.admin
    dave = world.as_(admin.add_user("dave", ["bio"], False, None).text)
    dave.whoami()
    dave.runs("*")
    with pytest.raises(NotFound):
        dave.status("bio/nothing")
    _denied(lambda: dave.start("chem/d-1", QUICK))
    world.alice.start("chem/aud-1", QUICK)
    _denied(lambda: dave.cancel("chem/aud-1"), "dave may not cancel on chem/aud-1 (not dave's)")
    with pytest.raises(NotFound):
        _exec(dave, "bio/none", "true")
    with pytest.raises(Unauthenticated):
        world.as_("not-a-token-at-all").whoami()
    # allowed, it runs and fails: the entry says how it ended
    with pytest.raises(InvalidInput):
        dave.start("bio/bad-1", "version: v4\njobs: {}\n")
    calls = [
        (e.method, e.verb, e.target, e.allowed, e.outcome) for e in admin.audit("dave", None, 100)
    ]
    assert calls == [
        ("WhoAmI", "-", "", True, "ok"),
        ("ListWorkflows", "status", "", True, "ok"),
        ("GetWorkflow", "status", "bio/nothing", False, "not-found"),
        ("StartWorkflow", "start", "chem/d-1", False, "denied"),
        ("CancelWorkflow", "cancel", "chem/aud-1", False, "denied"),
        ("Exec", "exec", "bio/none", False, "not-found"),
        ("StartWorkflow", "start", "bio/bad-1", True, "invalid"),
    ]
    denied = admin.audit("dave", None, 100)[3]
    assert "dave may not start on chem/d-1" in denied.detail
    assert denied.peer
    anonymous = [e for e in admin.audit("", None, 1000) if not e.user]
    assert anonymous
    assert anonymous[-1].detail == "unknown token"
    assert not anonymous[-1].allowed
    assert anonymous[-1].outcome == "unauthenticated"


def test_a_flood_of_bad_tokens_is_counted_not_written_one_by_one() -> None:
    throttle = Throttle(per_minute=3)
    minute = 60.0 * 1000
    assert [throttle.admit("ipv4:10.0.0.9", minute) for _ in range(5)] == [
        (True, 0),
        (True, 0),
        (True, 0),
        (False, 0),
        (False, 0),
    ]
    assert throttle.admit("ipv4:10.0.0.8", minute) == (True, 0)  # another address
    # the next minute's first entry counts the two that were not written
    assert throttle.admit("ipv4:10.0.0.9", minute + 60) == (True, 2)
    assert throttle.admit("ipv4:10.0.0.9", minute + 61) == (True, 0)


def test_names_under_a_users_name_are_that_users(world: World) -> None:
    _denied(lambda: world.bob.start("alice/mine-now", QUICK), "names under alice/ are alice's")
    _denied(lambda: world.bob.start("Alice/mine-now", QUICK), "names under alice/ are alice's")
    # names are plain, and none can pass for another run's id
    run_id = world.alice.start("chem/id-1", QUICK).id
    for name in (" alice/x", "alice\u200b/x", "/alice/x", run_id, run_id.upper()):
        with pytest.raises(InvalidInput, match="cannot name a run"):
            world.bob.start(name, QUICK)
    assert world.alice.status(run_id).name == "chem/id-1"
    request = pb.CreateScheduleRequest(name="alice/nightly", fuzzfile=QUICK, cron="0 3 * * *")
    _denied(lambda: world.bob.create_schedule(request), "names under alice/ are alice's")


def test_a_stream_without_a_token_is_refused_before_it_says_anything(world: World) -> None:
    silent = threading.Event()

    def nothing() -> Iterator[pb.ExecInput]:
        silent.wait(30)
        yield from ()

    started = time.monotonic()
    try:
        with pytest.raises(Unauthenticated, match="unknown token"):
            list(world.as_("sqt_0000_" + "z" * 40).exec(nothing()))
    finally:
        silent.set()
    assert time.monotonic() - started < 10  # not after the client's silence


def test_open_streams_are_cut_off_when_their_token_stops_working(world: World) -> None:
    admin, alice, gate = world.admin, world.alice, world.servicer.gate
    alice.start("chem/long-1", NOTEBOOK)
    _wait(
        "the notebook",
        lambda: b"serving" in b"".join(alice.logs("chem/long-1", "notebook", 0, False)),
    )

    def open_stream(stream: Callable[[], Iterator[object]]) -> tuple[list[object], list[Exception]]:
        got: list[object] = []
        failed: list[Exception] = []

        def read() -> None:
            try:
                for item in stream():
                    got.append(item)
            except SquallError as exc:
                failed.append(exc)

        threading.Thread(target=read, daemon=True).start()
        _wait("the stream's first message", lambda: got)
        return got, failed

    # revoked through the server: the stream following the log ends at once
    laptop = alice.create_token("", None, "laptop")
    following = world.as_(laptop.text)
    _, failed = open_stream(lambda: following.logs("chem/long-1", "notebook", 0, True))
    admin.revoke_token(laptop.token.id)
    _wait("the log stream to be cut off", lambda: failed, timeout=10)
    assert isinstance(failed[0], Unauthenticated), failed[0]
    assert f"token {laptop.token.id} was revoked" in str(failed[0])
    # revoked behind the server's back (another process on its store): the next check ends it
    gate.recheck_s = 0.3
    try:
        desk = alice.create_token("", None, "desk")
        watching = world.as_(desk.text)
        _, failed = open_stream(lambda: watching.watch("chem/long-1"))
        identity.revoke_token(world.servicer.engine.store, desk.token.id)
        _wait("the watch to be cut off", lambda: failed, timeout=10)
        assert isinstance(failed[0], Unauthenticated), failed[0]
    finally:
        gate.recheck_s = STREAM_RECHECK_S
    # its user disabled through the server: an exec into the job ends at once
    shell = world.as_(alice.create_token("", None, "shell").text)
    hold = threading.Event()

    def typing() -> Iterator[pb.ExecInput]:
        command = ["sh", "-c", "echo started; sleep 60"]
        yield pb.ExecInput(
            start=pb.ExecStart(name="chem/long-1", job="notebook", index=0, command=command)
        )
        hold.wait(30)

    _, failed = open_stream(lambda: shell.exec(typing()))
    admin.disable_user("alice", True)
    try:
        _wait("the exec to be cut off", lambda: failed, timeout=10)
        assert isinstance(failed[0], Unauthenticated), failed[0]
        assert "user alice is disabled" in str(failed[0])
    finally:
        admin.disable_user("alice", False)
        hold.set()
    # and what it started in the job is gone with it
    _wait(
        "the exec's process to end",
        lambda: b"sleep 60" not in _exec(alice, "chem/long-1", "ps")[0],
        timeout=10,
    )
    # the server lets go of them too (a quiet job's log stream included)
    _wait("the server to close the streams", lambda: gate.open_streams() == 0, timeout=10)
    entries = admin.audit("alice", None, 1000)
    cut = [e for e in entries if e.detail.startswith("an open stream was cut off")]
    assert [(e.method, e.target) for e in cut] == [
        ("Logs", "chem/long-1"),
        ("WatchWorkflow", "chem/long-1"),
        ("Exec", "chem/long-1"),
    ]
    opened = [e for e in entries if e.method in ("Logs", "WatchWorkflow") and e.allowed]
    assert [e.outcome for e in opened[-2:]] == [
        f"cut off: token {laptop.token.id} was revoked",
        f"cut off: token {desk.token.id} was revoked",
    ]
    assert _exec(alice, "chem/long-1", "touch", "/tmp/done")[1] == 0
    assert _ended(alice, "chem/long-1") == "FINISHED"


def test_every_control_call_passes_the_gate() -> None:
    methods = pb.DESCRIPTOR.services_by_name["Control"].methods
    unguarded = [m.name for m in methods if not hasattr(getattr(ControlServer, m.name), "guard")]
    assert unguarded == []


def test_the_cli_logs_in_and_administers(world: World, tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    runner = CliRunner()
    login = runner.invoke(
        app,
        ["login", "--server", world.address, "--ca-file", str(world.ca), "--context", "lab"],
        input=ADMIN_TOKEN,
        env=env,
    )
    assert login.exit_code == 0, login.output
    assert "as admin" in login.output
    added = runner.invoke(app, ["admin", "user", "add", "erin", "-g", "chem"], env=env)
    assert added.exit_code == 0, added.output
    token = added.stdout.strip().splitlines()[-1]
    assert token.startswith("sqt_")
    erin = runner.invoke(
        app,
        ["login", "--server", world.address, "--ca-file", str(world.ca), "--context", "erin"],
        input=token,
        env=env,
    )
    assert erin.exit_code == 0
    assert "as erin (groups: chem)" in erin.output
    refused = runner.invoke(app, ["admin", "user", "list"], env=env)
    assert refused.exit_code == 4
    assert "erin may not admin" in refused.output
    listed = runner.invoke(
        app, ["admin", "audit", "--user", "erin", "-o", "json", "--context", "lab"], env=env
    )
    assert listed.exit_code == 0, listed.output
    # what a caller names goes into the log as one line: it cannot pass for another entry
    forged = "x\n2026-12-05T09:20:00.000+00:00  admin  AddUser (admin) mallory  allowed"
    runner.invoke(app, ["workflow", "status", forged], env=env)
    shown = runner.invoke(app, ["admin", "audit", "--user", "erin", "--context", "lab"], env=env)
    assert shown.exit_code == 0, shown.output
    assert [line for line in shown.stdout.splitlines() if "mallory" in line] == [
        line for line in shown.stdout.splitlines() if "GetWorkflow" in line
    ]
    assert "x\\n2026" in shown.stdout
    denied = runner.invoke(
        app,
        ["admin", "audit", "--user", "erin", "--denied", "-o", "json", "--context", "lab"],
        env=env,
    )
    assert {e["method"] for e in json.loads(denied.stdout)} == {"ListUsers", "GetWorkflow"}
    assert '"method": "ListUsers"' in listed.stdout
    assert '"allowed": false' in listed.stdout
    # what scripts read: -o json from the calls that change things
    made = runner.invoke(app, ["admin", "token", "create", "--note", "ci", "-o", "json"], env=env)
    assert made.exit_code == 0, made.output
    made_id = json.loads(made.stdout)["token"]["id"]
    revoked = runner.invoke(app, ["admin", "token", "revoke", made_id, "-o", "json"], env=env)
    assert revoked.exit_code == 0, revoked.output
    assert json.loads(revoked.stdout)["state"] == "revoked"
    secret = runner.invoke(
        app, ["secret", "set", "secret://user/CLI_KEY", "-o", "json"], input="cli-value", env=env
    )
    assert secret.exit_code == 0, secret.output
    assert json.loads(secret.stdout) == {
        "ref": "secret://user/CLI_KEY",
        "scope": "user",
        "holder": "erin",
    }
    rotated = runner.invoke(app, ["admin", "rotate-key", "-o", "json", "--context", "lab"], env=env)
    assert rotated.exit_code == 0, rotated.output
    assert json.loads(rotated.stdout)["reencrypted"] >= 1  # erin's, at least
    gone = runner.invoke(app, ["secret", "delete", "secret://user/CLI_KEY", "-o", "json"], env=env)
    assert json.loads(gone.stdout) == {"deleted": "secret://user/CLI_KEY"}


def test_a_bad_access_policy_is_refused_naming_where() -> None:
    cases = {
        "grants: [{to: [group:x], verbs: [fly]}]": "grants[0].verbs: unknown fly",
        "grants: [{to: [team:x], verbs: [log]}]": "grants[0].to: 'team:x'",
        "grants: [{to: ['*'], verbs: [log], runs: all}]": "grants[0].runs",
        "grants: [{verbs: [log]}]": "grants[0]: `to` is required",
        "grants: [{to: ['*'], verbs: [log], site: [aws]}]": "grants[0].site: unknown key",
        "rules: []": "one key, `grants`",
        "grants:\n  - to: ['*']\n    verbs: [log]\n    verbs: [admin]\n": (
            "policy.yaml:4:5: error: grants[0].verbs: duplicate key 'verbs'"
        ),
        "grants:\n  - to: ['*']\n    verbs: [log]\n    runs: every\n": "policy.yaml:4: grants",
        "": "the access policy is empty",
        "grants: [{to: [group:chem], verbs: [admin], workflows: ['chem/*']}]": (
            "grants[0].workflows: `workflows` does not narrow `admin`"
        ),
        "grants: [{to: ['*'], verbs: [log], sites: [aws]}]": "add `start`",
        "grants: [{to: ['*'], verbs: [log], workflows: ['']}]": "a name cannot be empty",
    }
    for text, words in cases.items():
        with pytest.raises(InvalidInput) as caught:
            parse_access_policy(text, "policy.yaml")
        assert str(caught.value).startswith("policy.yaml"), caught.value
        assert words in str(caught.value), caught.value


def test_sites_a_policy_names_that_no_site_has_are_found() -> None:
    policy = parse_access_policy(
        "grants:\n  - to: ['*']\n    verbs: [start]\n    sites: [aws, lcoal, lab]\n", "p.yaml"
    )
    known = Placer().site_names()
    assert "local" in known
    assert policy.unknown_sites(known | {"lab"}) == ["lcoal"]
