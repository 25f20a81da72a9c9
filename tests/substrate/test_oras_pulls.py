"""`oras://` pulls from registries that lie or fail: a stub registry (http.server on
127.0.0.1) that serves what the test tells it to, a closed port, and roots that would not fit.

What must hold: only a manifest with exactly one SIF layer is accepted, read once; the SIF's
bytes must be the size and digest that manifest names before anything is filed under that
digest, and nothing is left in the cache when they are not; a registry that cannot be reached
or answers 5xx fails the pull in seconds, in one line naming it; a root file system larger
than the cache allows, or than the space it has, is refused before unsquashfs writes it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from substrate import sifroot
from substrate.images import ImageCache, ImageError
from substrate.sif import SifError
from tests.substrate.registry import Registry, free_port
from tests.substrate.sif_images import (
    SIF_CONFIG,
    SIF_LAYER,
    build_sif,
    push_sif,
    squashfs,
    write_sif,
)

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ONE_SIF_LAYER = (
    f"it is not a SIF image: its manifest must hold exactly one layer of type {SIF_LAYER}"
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    length: int | None = -1  # Content-Length: -1 for len(body), None for none (then close)


class Stub:
    """A registry that answers what `routes` says, and records what it was asked."""

    def __init__(self) -> None:
        self.routes: dict[str, Answer] = {}
        self.requests: list[str] = []
        self.fail: int = 0  # answer every request with this status, when set
        self.login: tuple[str, str] | None = None  # when set: a token realm that takes it
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                stub.answer(self, "GET")

            def do_HEAD(self) -> None:
                stub.answer(self, "HEAD")

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        self.requests.append(f"{method} {handler.path}")
        missing = Answer(404, b'{"errors": [{"code": "NOT_FOUND", "message": "unknown"}]}')
        answer = Answer(self.fail) if self.fail else self.routes.get(handler.path, missing)
        if self.login is not None:
            answer = self.token_auth(handler, answer)
        handler.send_response(answer.status)
        for name, value in answer.headers.items():
            handler.send_header(name, value)
        length = len(answer.body) if answer.length == -1 else answer.length
        if length is not None:
            handler.send_header("Content-Length", str(length))
        if length is None or length != len(answer.body):
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        if method == "GET":
            handler.wfile.write(answer.body)

    def token_auth(self, handler: BaseHTTPRequestHandler, answer: Answer) -> Answer:
        """As Docker Hub and most registries do: a 401 naming a token realm, whose token
        is given for the right basic login only."""
        assert self.login is not None
        given = handler.headers.get("Authorization", "")
        if handler.path.startswith("/token?"):
            basic = base64.b64encode(":".join(self.login).encode()).decode()
            if given != f"Basic {basic}":
                return Answer(401, b'{"errors": [{"code": "UNAUTHORIZED", "message": "no"}]}')
            assert "scope=repository%3Asifs%2Fprivate%3Apull" in handler.path
            return Answer(body=json.dumps({"token": "t0ken"}).encode())
        if given == "Bearer t0ken":
            return answer
        realm = f"http://{self.address}/token"
        challenge = f'Bearer realm="{realm}",service="stub",scope="repository:sifs/private:pull"'
        return Answer(
            401,
            b'{"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}',
            {"WWW-Authenticate": challenge},
        )

    def artifact(self, name: str, layers: list[dict[str, object]]) -> str:
        """Serve a manifest holding `layers` as `name` (REPO:TAG); its oras:// reference."""
        repo, tag = name.split(":")
        config = b"{}"
        self.routes[f"/v2/{repo}/blobs/{sha256(config)}"] = Answer(body=config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": SIF_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": layers,
        }
        body = json.dumps(manifest).encode()
        self.routes[f"/v2/{repo}/manifests/{tag}"] = Answer(
            body=body, headers={"Content-Type": MANIFEST}
        )
        return f"oras://{self.address}/{name}"

    def blob(self, repo: str, digest: str, answer: Answer) -> None:
        self.routes[f"/v2/{repo}/blobs/{digest}"] = answer

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Stub]:
    s = Stub()
    yield s
    s.close()


@dataclass(frozen=True)
class Sifs:
    genuine: bytes  # the busybox SIF
    other: bytes  # another SIF: a root holding only /poisoned


@pytest.fixture(scope="module")
def sifs(tmp_path_factory: pytest.TempPathFactory) -> Sifs:
    work = tmp_path_factory.mktemp("sifs")
    genuine = build_sif(work / "genuine").read_bytes()
    root = work / "other-root"
    root.mkdir()
    (root / "poisoned").write_text("not the image you asked for\n")
    other = write_sif(work / "other.sif", squashfs(root, work / "other.squashfs")).read_bytes()
    return Sifs(genuine, other)


def sif_layer(digest: str, size: int, media_type: str = SIF_LAYER) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def cache_files(root: Path) -> list[str]:
    """Every file under the cache (folders and the lock file pulls take aside)."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not p.is_dir() and p != root / ".pull.lock"
    )


def evil_tar(outside: Path) -> bytes:
    """A tar.gz that writes `outside/pwned` when extracted with no filter: a link to
    `outside`, then a file through it."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        link = tarfile.TarInfo("escape")
        link.type = tarfile.SYMTYPE
        link.linkname = str(outside)
        tar.addfile(link)
        payload = b"written by the registry\n"
        member = tarfile.TarInfo("escape/pwned")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    return data.getvalue()


# ---- what the manifest must be --------------------------------------------------------------


@pytest.mark.parametrize("case", ["tar-gzip-with-a-link-out", "two-layers", "digest-as-a-path"])
def test_a_manifest_that_is_not_one_sif_layer_is_refused_and_nothing_is_fetched(
    stub: Stub, sifs: Sifs, tmp_path: Path, case: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    genuine = sif_layer(sha256(sifs.genuine), len(sifs.genuine))
    stub.blob("evil/sif", sha256(sifs.genuine), Answer(body=sifs.genuine))
    if case == "tar-gzip-with-a-link-out":
        tar = evil_tar(outside)
        layer = sif_layer(sha256(tar), len(tar), TAR_GZIP)
        layer["annotations"] = {"org.opencontainers.image.title": "rootfs"}
        stub.blob("evil/sif", sha256(tar), Answer(body=tar))
        layers = [layer]
        why = f"{ONE_SIF_LAYER}, and holds {TAR_GZIP}"
    elif case == "two-layers":
        layers = [genuine, genuine]
        why = f"{ONE_SIF_LAYER}, and holds {SIF_LAYER}, {SIF_LAYER}"
    else:
        layers = [sif_layer("sha256:../../../../outside/x", len(sifs.genuine))]
        why = "its SIF layer names no valid sha256 digest and size"
    ref = stub.artifact("evil/sif:1.0", layers)
    cache = ImageCache(tmp_path / "images", insecure_registries=(stub.address,))
    with pytest.raises(ImageError) as info:
        cache.get(ref)
    assert list(outside.iterdir()) == []  # nothing written outside the cache
    message = str(info.value)
    assert message == f"pull of {ref} failed: {why}"
    assert "\n" not in message
    assert not [r for r in stub.requests if "/blobs/" in r]  # no layer was even fetched
    assert cache_files(cache.root) == []


def test_the_manifest_is_read_once_and_the_sif_streamed_once(
    stub: Stub, sifs: Sifs, tmp_path: Path
) -> None:
    digest = sha256(sifs.genuine)
    ref = stub.artifact("sifs/busybox:1.0", [sif_layer(digest, len(sifs.genuine))])
    stub.blob("sifs/busybox", digest, Answer(body=sifs.genuine))
    cache = ImageCache(tmp_path / "images", insecure_registries=(stub.address,))
    image = cache.get(ref)
    assert image.digest == digest
    assert image.sif is not None
    assert image.sif.read_bytes() == sifs.genuine
    assert (image.rootfs / "bin" / "busybox").is_file()
    assert stub.requests == [
        "GET /v2/sifs/busybox/manifests/1.0",
        f"GET /v2/sifs/busybox/blobs/{digest}",
    ]
    assert cache.get(ref).cached  # pulled anonymously: reused without asking the registry
    assert len(stub.requests) == 2
    assert not list((cache.root / "staging").iterdir())


def test_a_token_registry_gives_its_token_for_the_right_login_only(
    stub: Stub, sifs: Sifs, tmp_path: Path
) -> None:
    """The Bearer flow (Docker Hub's, GHCR's): the login goes to the token realm only."""
    digest = sha256(sifs.genuine)
    ref = stub.artifact("sifs/private:1.0", [sif_layer(digest, len(sifs.genuine))])
    stub.blob("sifs/private", digest, Answer(body=sifs.genuine))
    stub.login = ("robot", "secret-" + os.urandom(4).hex())
    cache = ImageCache(tmp_path / "images", insecure_registries=(stub.address,))
    for login, why in [
        (None, "the registry requires authentication and no credentials were given"),
        (("robot", "wrong"), "authentication failed: the registry refused the credentials"),
    ]:
        with pytest.raises(ImageError) as info:
            cache.get(ref, login)
        assert str(info.value).startswith(f"pull of {ref} failed: {why} ("), str(info.value)
    image = cache.get(ref, stub.login)
    assert image.digest == digest
    assert (image.rootfs / "bin" / "busybox").is_file()
    with pytest.raises(ImageError, match="requires authentication"):
        cache.get(ref)  # cached, and still not given without the login


# ---- the bytes must be what the manifest names -----------------------------------------------


def test_bytes_that_do_not_have_the_claimed_digest_are_refused_and_poison_nothing(
    stub: Stub, registry: Registry, sifs: Sifs, tmp_path: Path
) -> None:
    """A registry that names the digest of a genuine image and serves another SIF: the pull
    fails, nothing is filed under that digest, and the genuine image pulled from an honest
    registry afterwards is its own root."""
    claimed = sha256(sifs.genuine)
    ref = stub.artifact("sifs/genuine:1.0", [sif_layer(claimed, len(sifs.other))])
    stub.blob("sifs/genuine", claimed, Answer(body=sifs.other))
    cache = ImageCache(tmp_path / "images", insecure_registries=(stub.address, registry.address))
    with pytest.raises(ImageError) as info:
        cache.get(ref)
    assert str(info.value) == (
        f"pull of {ref} failed: the SIF received has digest {sha256(sifs.other)}, not the "
        f"{claimed} its manifest names"
    )
    assert cache_files(cache.root) == []

    (tmp_path / "genuine.sif").write_bytes(sifs.genuine)
    honest = push_sif(registry.address, tmp_path / "genuine.sif", "sifs/genuine:1.0")
    image = cache.get(honest)
    assert image.digest == claimed
    assert (image.rootfs / "bin" / "busybox").is_file()
    assert not (image.rootfs / "poisoned").exists()


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("longer", "the registry sends {n} bytes for its SIF, whose manifest declares {size}"),
        ("unannounced", "the registry sent more than the {size} bytes its manifest declares"),
        ("cut-short", "broke off sending"),
        ("over-the-cap", "its SIF is {human}, more than the 4.0 MiB this node takes"),
    ],
)
def test_a_sif_of_another_size_than_declared_or_over_the_cap_is_refused(
    stub: Stub, sifs: Sifs, tmp_path: Path, case: str, why: str
) -> None:
    data = sifs.genuine
    digest = sha256(data)
    size = len(data)
    answer = Answer(body=data)
    if case == "longer":
        answer = Answer(body=data + b"\0" * 4096)
    elif case == "unannounced":
        answer = Answer(body=data + b"\0" * 4096, length=None)
    elif case == "cut-short":
        answer = Answer(body=data[: size // 2], length=size)
    else:
        size = 8 * 2**20 + 1
    ref = stub.artifact("sifs/sized:1.0", [sif_layer(digest, size)])
    stub.blob("sifs/sized", digest, answer)
    cache = ImageCache(
        tmp_path / "images", insecure_registries=(stub.address,), max_sif_bytes=4 * 2**20
    )
    with pytest.raises(ImageError) as info:
        cache.get(ref)
    message = str(info.value)
    expected = why.format(n=len(answer.body), size=size, human="8.0 MiB")
    assert message.startswith(f"pull of {ref} failed: "), message
    assert expected in message
    assert "\n" not in message
    assert cache_files(cache.root) == []
    if case == "over-the-cap":
        assert not [r for r in stub.requests if "/blobs/" in r]


# ---- a registry that cannot be reached, or fails ---------------------------------------------


def test_an_unreachable_registry_fails_the_pull_in_seconds_naming_it(tmp_path: Path) -> None:
    port = free_port()  # bound, then closed: nothing listens there
    ref = f"oras://127.0.0.1:{port}/sifs/gone:1.0"
    cache = ImageCache(tmp_path / "images", insecure_registries=(f"127.0.0.1:{port}",))
    start = time.monotonic()
    with pytest.raises(ImageError) as info:
        cache.get(ref)
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert message.startswith(f"pull of {ref} failed: registry 127.0.0.1:{port} cannot be reached")
    assert "\n" not in message
    assert cache_files(cache.root) == []


def test_a_registry_that_answers_500_fails_the_pull_in_seconds(stub: Stub, tmp_path: Path) -> None:
    stub.fail = 500
    ref = f"oras://{stub.address}/sifs/broken:1.0"
    cache = ImageCache(tmp_path / "images", insecure_registries=(stub.address,))
    start = time.monotonic()
    with pytest.raises(ImageError) as info:
        cache.get(ref)
    assert time.monotonic() - start < 15
    assert str(info.value).startswith(
        f"pull of {ref} failed: registry {stub.address} answered 500 for sifs/broken:1.0"
    )
    assert 2 <= len(stub.requests) <= 4  # tried again, a few times only


# ---- a root that would not fit ---------------------------------------------------------------


def test_a_root_larger_than_the_cap_is_refused_before_it_is_written(
    registry: Registry, tmp_path: Path
) -> None:
    """A few KiB of squashfs that expands to 256 MiB (a file of zeros)."""
    root = tmp_path / "bomb-root"
    root.mkdir()
    with open(root / "zeros", "wb") as f:
        f.truncate(256 * 2**20)
    sif = write_sif(tmp_path / "bomb.sif", squashfs(root, tmp_path / "bomb.squashfs"))
    assert sif.stat().st_size < 2**20
    ref = push_sif(registry.address, sif, "sifs/bomb:1.0")
    cache = ImageCache(
        tmp_path / "images", insecure_registries=(registry.address,), max_root_bytes=64 * 2**20
    )
    with pytest.raises(ImageError) as info:
        cache.get(ref)
    message = str(info.value)
    assert message == (
        f"{ref} cannot run here: its root file system would take 256.0 MiB, more than the "
        "64.0 MiB one image may take on this node"
    )
    assert cache_files(cache.root) == []


def test_a_root_larger_than_the_free_space_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sif = build_sif(tmp_path / "sif")
    target = tmp_path / "rootfs" / "busybox"
    target.parent.mkdir()
    monkeypatch.setattr(sifroot, "free_bytes", lambda _: 2**20)
    with pytest.raises(SifError) as info:
        sifroot.unpack(sif, target, None)
    assert str(info.value).startswith("its root file system would take ")
    assert str(info.value).endswith(" MiB, more than the 1.0 MiB free where images are kept")
    assert list(target.parent.iterdir()) == []
    assert os.path.exists(sif)
