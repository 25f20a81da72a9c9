"""Registry credentials in the image cache: pulled from a registry that requires a login
(docker-registry with htpasswd, HTTPS), the credentials handed to skopeo in memory only; a
private SIF (oras://) pulled with the same login; a private image in the cache given only to
a caller whose login the registry takes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from substrate.images import Image, ImageCache, ImageError, _reason
from tests.substrate.registry import Registry, build_busybox_image
from tests.substrate.sif_images import build_sif, push_sif

PASSWORD = "pw-" + os.urandom(8).hex()
RIGHT = ("robot", PASSWORD)
WRONG = ("robot", "wrong-" + PASSWORD)


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    work = tmp_path_factory.mktemp("private-registry")
    reg = Registry(work, credentials=RIGHT)
    reg.push(build_busybox_image(work / "image"), "1.36", "team/busybox:1.36")
    push_sif(reg.address, build_sif(work / "sif"), "team/busybox-sif:1.0", RIGHT)
    yield reg
    reg.stop()


def refs(private: Registry) -> dict[str, str]:
    return {
        "docker": f"docker://{private.address}/team/busybox:1.36",
        "oras": f"oras://{private.address}/team/busybox-sif:1.0",
    }


def test_credentials_reach_skopeo_in_memory_only(
    private: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """skopeo reads its auth file from a memfd (what /proc/self/fd/N points to while it
    starts), and no argument holds the password."""
    seen: list[tuple[list[str], str]] = []
    real = subprocess.Popen

    def popen(cmd: list[str], **kw: Any) -> Any:
        if cmd[:2] == ["skopeo", "copy"] and "--src-authfile" in cmd:
            path = cmd[cmd.index("--src-authfile") + 1]
            target = os.readlink(path) if path.startswith("/proc/self/fd/") else path
            seen.append((cmd, target))
        return real(cmd, **kw)

    monkeypatch.setattr("substrate.images.subprocess.Popen", popen)
    cache = ImageCache(tmp_path, (), (private.address,))
    ref = f"docker://{private.address}/team/busybox:1.36"
    with pytest.raises(ImageError, match="authentication failed"):
        cache.get(ref, ("robot", "wrong-" + PASSWORD))
    image = cache.get(ref, ("robot", PASSWORD))
    assert (image.rootfs / "bin" / "busybox").exists()
    assert len(seen) == 2
    for cmd, target in seen:
        assert target.startswith("/memfd:"), target
        assert not any(PASSWORD in arg for arg in cmd)


def test_no_credentials_for_a_private_registry_says_so(private: Registry, tmp_path: Path) -> None:
    cache = ImageCache(tmp_path, (), (private.address,))
    with pytest.raises(ImageError, match="requires authentication and no credentials"):
        cache.get(f"docker://{private.address}/team/busybox:1.36")


def refused(cache: ImageCache, ref: str, credentials: tuple[str, str] | None) -> str:
    """The one line `cache.get` fails with, checked to hold no secret."""
    with pytest.raises(ImageError) as info:
        cache.get(ref, credentials)
    message = str(info.value)
    assert "\n" not in message
    assert PASSWORD not in message
    return message


def test_a_private_sif_is_pulled_with_the_right_login_only(
    private: Registry, tmp_path: Path
) -> None:
    ref = refs(private)["oras"]
    cache = ImageCache(tmp_path, (), (private.address,))
    assert refused(cache, ref, None).startswith(
        f"pull of {ref} failed: the registry requires authentication and no credentials were "
        "given ("
    )
    assert refused(cache, ref, WRONG).startswith(
        f"pull of {ref} failed: authentication failed: the registry refused the credentials ("
    )
    assert not list(tmp_path.glob("sif/*"))
    image = cache.get(ref, RIGHT)
    assert not image.cached
    assert (image.rootfs / "bin" / "busybox").is_file()
    assert image.entrypoint == ("/.singularity.d/runscript",)


@pytest.mark.parametrize("kind", ["docker", "oras"])
def test_a_cached_private_image_is_given_only_to_a_login_the_registry_takes(
    private: Registry, tmp_path: Path, kind: str
) -> None:
    ref = refs(private)[kind]
    cache = ImageCache(tmp_path, (), (private.address,))
    first = cache.get(ref, RIGHT)
    assert not first.cached
    assert "requires authentication and no credentials" in refused(cache, ref, None)
    assert "authentication failed: the registry refused" in refused(cache, ref, WRONG)
    again = cache.get(ref, RIGHT)
    assert again.cached
    assert again.rootfs == first.rootfs
    # a new process (the agent restarted) knows nobody: it asks the registry first
    restarted = ImageCache(tmp_path, (), (private.address,))
    assert "requires authentication and no credentials" in refused(restarted, ref, None)
    assert restarted.get(ref, RIGHT).cached
    assert "authentication failed: the registry refused" in refused(restarted, ref, WRONG)


@pytest.mark.parametrize("kind", ["docker", "oras"])
def test_a_caller_without_the_login_does_not_share_a_pull_in_flight(
    private: Registry, tmp_path: Path, kind: str
) -> None:
    """Callers waiting on one pull share its outcome only when they hold the same login."""
    ref = refs(private)[kind]
    cache = ImageCache(tmp_path, (), (private.address,))
    outcomes: dict[str, object] = {}

    def pull(name: str, login: tuple[str, str] | None) -> None:
        try:
            outcomes[name] = cache.get(ref, login)
        except ImageError as exc:
            outcomes[name] = exc

    threads = [
        threading.Thread(target=pull, args=(name, login))
        for name, login in [("right", RIGHT), ("none", None), ("wrong", WRONG), ("again", RIGHT)]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(outcomes["right"], Image)
    assert isinstance(outcomes["again"], Image)
    assert "requires authentication and no credentials" in str(outcomes["none"])
    assert "authentication failed: the registry refused" in str(outcomes["wrong"])


def test_an_image_pulled_anonymously_is_reused_without_asking_the_registry(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = f"docker://{registry.address}/busybox:1.36"
    cache = ImageCache(tmp_path, (), (registry.address,))
    assert not cache.get(ref).cached

    def no_request(*_: object, **__: object) -> None:
        raise AssertionError("the registry was asked about a public image")

    monkeypatch.setattr("substrate.images.RegistryClient", no_request)
    assert cache.get(ref).cached
    assert cache.get(ref, RIGHT).cached  # anyone may have what was pulled without a login


def test_skopeos_quoted_reason_is_given_without_its_escapes() -> None:
    stderr = (
        'time="2026-01-02T03:04:05Z" level=fatal msg="initializing source docker://x.io/a:1: '
        'pinging container registry x.io: Get \\"https://x.io/v2/\\": dial tcp: lookup x.io: '
        'no such host"\n'
    )
    assert _reason(stderr) == (
        "initializing source docker://x.io/a:1: pinging container registry x.io: "
        'Get "https://x.io/v2/": dial tcp: lookup x.io: no such host'
    )


@pytest.mark.parametrize("kind", ["docker", "oras"])
def test_agents_sharing_an_image_folder_pull_once_and_each_checks_logins(
    private: Registry, tmp_path: Path, kind: str
) -> None:
    """The caches of two agents on one folder (a local site's nodes share one), asked at once:
    one pulls, the other waits for the folder's lock and takes what it pulled as cached. A
    third agent's caller whose login the registry refuses gets nothing from that pull."""
    ref = refs(private)[kind]
    agents = [ImageCache(tmp_path, (), (private.address,)) for _ in range(2)]
    got: list[Image] = []
    threads = [threading.Thread(target=lambda c=c: got.append(c.get(ref, RIGHT))) for c in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(image.cached for image in got) == [False, True]  # one pull between them
    assert got[0].rootfs == got[1].rootfs
    third = ImageCache(tmp_path, (), (private.address,))
    assert "authentication failed: the registry refused" in refused(third, ref, WRONG)
    assert "requires authentication and no credentials" in refused(third, ref, None)
    assert third.get(ref, RIGHT).cached


@pytest.mark.parametrize("kind", ["docker", "oras"])
def test_a_run_that_takes_another_agents_pull_unchecked_grants_no_login(
    private: Registry, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent's Run (which carries no login and takes the cache as it is) that finds, once
    it has the folder's lock, what another agent pulled with a login, vouches for nobody:
    neither a caller without the login waiting on that Run's pull nor a later one gets the
    image without the registry taking its login."""
    ref = refs(private)[kind]
    other = ImageCache(tmp_path, (), (private.address,))
    runner = ImageCache(tmp_path, (), (private.address,))
    real = runner._folder_lock
    outcomes: list[object] = []
    waiting = threading.Event()

    def pull_without_login() -> None:
        def progress(line: str) -> None:
            if line.startswith("waiting for a pull"):
                waiting.set()

        try:
            outcomes.append(runner.get(ref, None, progress))
        except ImageError as exc:
            outcomes.append(exc)

    waiter = threading.Thread(target=pull_without_login)

    @contextlib.contextmanager
    def lock_after_another_agents_pull() -> Iterator[None]:
        waiter.start()  # joins the Run's pull in flight in this agent
        assert waiting.wait(30)
        assert not other.get(ref, RIGHT).cached  # lands while the Run waits for the lock
        with real():
            yield

    monkeypatch.setattr(runner, "_folder_lock", lock_after_another_agents_pull)
    assert runner.get(ref, check_access=False).cached
    waiter.join()
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], ImageError), outcomes
    assert "requires authentication and no credentials" in str(outcomes[0])
    assert "requires authentication and no credentials" in refused(runner, ref, None)
    assert "authentication failed: the registry refused" in refused(runner, ref, WRONG)
    assert runner.get(ref, RIGHT).cached


def test_a_run_takes_the_search_registry_its_pull_resolved_not_another_runs_earlier_one(
    private: Registry, registry: Registry, tmp_path: Path
) -> None:
    """Agents of different runs share a folder and search the private registry first. A run
    whose login the private registry refuses pulls the public image of that name; its Run
    (no login, the cache as it is) gets that image, not the private one of the same name that
    another run's agent left cached earlier in the search order."""
    layout = build_busybox_image(tmp_path / "image")
    private.push(layout, "1.36", "shadowed/busybox:1.36")
    registry.push(layout, "1.36", "shadowed/busybox:1.36")
    search = (private.address, registry.address)
    ref = "docker://shadowed/busybox:1.36"
    owner = ImageCache(tmp_path / "images", search, search)
    assert owner.get(ref, RIGHT).reference.startswith(f"docker://{private.address}/")
    other = ImageCache(tmp_path / "images", search, search)
    public = f"docker://{registry.address}/shadowed/busybox:1.36"
    assert other.get(ref, None).reference == public  # the private one refused it
    assert other.get(ref, check_access=False).reference == public
