"""Registry credentials in the image cache: pulled from a registry that requires a login
(docker-registry with htpasswd, HTTPS), the credentials handed to skopeo in memory only."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from substrate.images import ImageCache, ImageError
from tests.substrate.registry import Registry, build_busybox_image

PASSWORD = "pw-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    work = tmp_path_factory.mktemp("private-registry")
    reg = Registry(work, credentials=("robot", PASSWORD))
    reg.push(build_busybox_image(work / "image"), "1.36", "team/busybox:1.36")
    yield reg
    reg.stop()


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
