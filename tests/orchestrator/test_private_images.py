"""Images from a registry that requires a login (Debian's docker-registry with htpasswd, over
HTTPS with a certificate made here): runs with the right secret, the wrong one, none; images
that do not exist. Real agents, skopeo, crun and SQLite; nothing is mocked."""

from __future__ import annotations

import base64
import getpass
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.engine import Engine
from orchestrator.errors import InvalidInput
from orchestrator.fuzzfile import Workflow
from orchestrator.provision import LocalProvisioner, NodeSlice
from orchestrator.runloop import log_path
from orchestrator.scheduler import TaskKey
from orchestrator.store import Event, RunState, Store
from tests.substrate.registry import Registry, build_busybox_image

USER = "robot"
PASSWORD = "pw-" + os.urandom(8).hex()
SQUALL = str(Path(sys.executable).parent / "squall")


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    work = tmp_path_factory.mktemp("private-registry")
    reg = Registry(work, credentials=(USER, PASSWORD))
    reg.push(build_busybox_image(work / "image"), "1.36", "team/busybox:1.36")
    yield reg
    reg.stop()


@pytest.fixture
def engine(tmp_path: Path, registry: Registry, private: Registry) -> Engine:
    """One node; the private registry is listed as insecure (its certificate was made here,
    so skopeo is told not to verify it), which changes nothing about its login."""

    def nodes(_: Workflow) -> list[NodeSlice]:
        return [NodeSlice(cpus=(0, 1), memory_bytes=2**30)]

    provisioner = LocalProvisioner(
        tmp_path / "site",
        nodes=nodes,
        search_registries=[registry.address],
        insecure_registries=[registry.address, private.address],
    )
    store = Store(f"sqlite:///{tmp_path / 'squall.db'}")
    return Engine(store, [provisioner], data_dir=tmp_path / "data")


def workflow(image: str) -> str:
    return "version: v4\n" + textwrap.dedent(f"""
        jobs:
          hello:
            image: {image}
            command: [/bin/echo, private hello]
    """)


def login(user: str = USER, password: str = PASSWORD) -> bytes:
    return json.dumps({"username": user, "password": password}).encode()


def assert_password_nowhere(root: Path) -> None:
    """Not in the store (where the secret is sealed), its events, the logs, the agents'
    files: nowhere under `root` (nor as the base64 of a basic-auth header or auth file)."""
    needles = (PASSWORD.encode(), base64.b64encode(f"{USER}:{PASSWORD}".encode()))
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(n in data for n in needles), path


def test_a_private_image_runs_with_its_secret_in_both_forms(
    engine: Engine, private: Registry, tmp_path: Path
) -> None:
    image = f"docker://{private.address}/team/busybox:1.36"
    engine.secrets.put("secret://user/REGISTRY", getpass.getuser(), login())
    outcome = engine.run(
        "user/private", workflow(f"{{uri: {image}, secret: secret://user/REGISTRY}}")
    )
    assert outcome.state is RunState.FINISHED, outcome.reason
    log = log_path(engine.data_dir, outcome.run_id, TaskKey("hello"), 1)
    assert log.read_text() == "private hello\n"
    # the legacy map: a username and a `${{ secret "NAME" }}` password (a run of its own: its
    # agent finds the image in the site's cache and gives it only once the registry took
    # this login: see the next test)
    engine.secrets.put("secret://user/REGISTRY_PW", getpass.getuser(), PASSWORD.encode())
    password = '${{ secret "REGISTRY_PW" }}'
    legacy = f"{{uri: {image}, secrets: {{username: {USER}, password: '{password}'}}}}"
    outcome = engine.run("user/private-legacy", workflow(legacy))
    assert outcome.state is RunState.FINISHED, outcome.reason
    with engine.store.session() as s:
        pulled = s.scalars(select(Event.message).where(Event.kind == "image")).all()
    assert pulled == [f"node-0: pulled {image}", f"node-0: cached {image}"]
    assert_password_nowhere(tmp_path)


def test_a_cached_private_image_is_not_given_to_a_later_run_with_a_wrong_login(
    engine: Engine, private: Registry
) -> None:
    """The site's image cache outlives runs: a later run's agent checks the image with the
    registry under that run's login before it gives it."""
    image = f"docker://{private.address}/team/busybox:1.36"
    engine.secrets.put("secret://user/REGISTRY", getpass.getuser(), login())
    engine.secrets.put("secret://user/WRONG", getpass.getuser(), login(password="not-" + PASSWORD))
    good = engine.run("user/good", workflow(f"{{uri: {image}, secret: secret://user/REGISTRY}}"))
    assert good.state is RunState.FINISHED, good.reason
    bad = engine.run("other/bad", workflow(f"{{uri: {image}, secret: secret://user/WRONG}}"))
    assert bad.state is RunState.FAILED
    assert f"image {image} cannot be pulled on node-0" in bad.reason
    with engine.store.session() as s:
        started = s.scalars(select(Event.message).where(Event.run_id == bad.run_id)).all()
    assert not any("attempt" in m for m in started)  # no job of it ever started


def test_a_wrong_password_fails_the_run_with_one_readable_line(
    engine: Engine, private: Registry, tmp_path: Path
) -> None:
    image = f"docker://{private.address}/team/busybox:1.36"
    engine.secrets.put(
        "secret://user/REGISTRY", getpass.getuser(), login(password="not-" + PASSWORD)
    )
    outcome = engine.run(
        "user/wrong", workflow(f"{{uri: {image}, secret: secret://user/REGISTRY}}")
    )
    assert outcome.state is RunState.FAILED
    reason = outcome.reason
    assert "\n" not in reason
    assert f"image {image} cannot be pulled on node-0" in reason
    assert "authentication failed" in reason
    assert "Rendezvous" not in reason
    assert "<" not in reason
    assert_password_nowhere(tmp_path)


def test_missing_or_malformed_image_secrets_are_refused_at_submit(
    engine: Engine, private: Registry, tmp_path: Path
) -> None:
    image = f"docker://{private.address}/team/busybox:1.36"
    with pytest.raises(InvalidInput, match=r"secrets that are not set: secret://user/REGISTRY"):
        engine.submit(
            "user/no-secret", workflow(f"{{uri: {image}, secret: secret://user/REGISTRY}}")
        )
    legacy = f"""{{uri: {image}, secrets: {{username: u, password: '${{{{ secret "PW" }}}}'}}}}"""
    with pytest.raises(InvalidInput, match=r"secrets that are not set: secret://user/PW"):
        engine.submit("user/no-legacy-secret", workflow(legacy))
    engine.secrets.put("secret://user/REGISTRY", getpass.getuser(), b"just-a-password")
    with pytest.raises(InvalidInput, match=r"must hold a mapping with a username and a password"):
        engine.submit(
            "user/bad-secret", workflow(f"{{uri: {image}, secret: secret://user/REGISTRY}}")
        )
    assert not (tmp_path / "site").exists()  # nothing started


def test_an_image_that_does_not_exist_fails_with_one_readable_line(
    engine: Engine, registry: Registry
) -> None:
    outcome = engine.run("user/missing-image", workflow("{uri: docker://busybox:no-such-tag}"))
    assert outcome.state is RunState.FAILED
    reason = outcome.reason
    assert reason.startswith("image docker://busybox:no-such-tag cannot be pulled")
    assert f"{registry.address}/busybox:no-such-tag" in reason
    assert "manifest unknown" in reason
    assert "\n" not in reason
    assert "Rendezvous" not in reason
    assert "<" not in reason


def test_squall_run_of_a_private_image(
    private: Registry, registry: Registry, tmp_path: Path
) -> None:
    """From the command line: the secret set through stdin, then `squall run`."""
    env = {
        **os.environ,
        "SQUALL_DATA_DIR": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "SQUALL_SEARCH_REGISTRIES": registry.address,
        "SQUALL_INSECURE_REGISTRIES": f"{registry.address},{private.address}",
    }
    env.pop("SQUALL_CONTEXT", None)
    fuzzfile = tmp_path / "private.yaml"
    image = f"docker://{private.address}/team/busybox:1.36"
    fuzzfile.write_text(workflow(f"{{uri: {image}, secret: secret://user/REGISTRY}}"))

    def squall(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SQUALL, *args], env=env, input=stdin, capture_output=True, text=True, timeout=180
        )

    refused = squall("run", str(fuzzfile), "--output", "json")
    assert refused.returncode != 0
    assert "secret://user/REGISTRY" in refused.stderr
    stored = squall("secret", "set", "secret://user/REGISTRY", stdin=login().decode())
    assert stored.returncode == 0, stored.stderr
    ran = squall("run", str(fuzzfile), "--output", "json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["state"] == "FINISHED"
    assert PASSWORD not in ran.stdout + ran.stderr
    assert_password_nowhere(tmp_path)
