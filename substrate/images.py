"""The node's image cache: `docker://` references pulled with skopeo and unpacked with umoci;
`oras://` references (Apptainer SIF files in an OCI registry) fetched over the distribution
API (`distribution.py`), and their squashfs root file system extracted (`sifroot.py`) so that
crun runs them like the rest.

Layout under `<data>/images/` (or the agent's `--image-dir`):
    oci/          one OCI image layout holding every pulled image (blobs shared by digest)
    rootfs/<d>/   the unpacked root filesystem of the manifest (or SIF blob) with digest <d>,
                  its owners shifted into the jobs' user namespace (`<d>-u<base>`) when
                  there is one
    sif/<d>.sif   a SIF file, by the sha256 of its bytes (what Apptainer runs, where chosen)
    staging/      SIF files as they arrive, moved to sif/ once their size and digest are right
    refs.json     resolved reference -> digest (a pulled tag is reused, not re-pulled)

An `oras://` pull reads the manifest once, takes only a manifest of exactly one SIF layer,
streams that layer into staging/ under a name of ours, up to the size its manifest declares
and the cache's cap, hashing it as it comes, and files it under its digest only when the
bytes have it. Its root is refused, before unsquashfs writes it, when it would be larger than
the cache's cap or the free space (`sifroot.py`).

Concurrent pulls of one reference by one login happen once: later callers wait for the first
and share its result. Agents on one machine may share the folder (a local site's nodes do): a
pull holds the folder's lock file (`.pull.lock`), and finds there what another agent pulled
while it waited for it, which it then takes as a cached image (checked with the registry like
any hit this process has not seen pulled).

Credentials go to skopeo in an auth file that lives only in memory (a memfd, read through
/proc/self/fd), never on disk or a command line; oras:// pulls keep them in the memory of the
request (`distribution.py`).

A private image in the cache is not given to a caller who has not shown access to it: the
cache remembers, in memory only, per reference, the logins (a salted hash of user and
password, the salt made per process and kept nowhere) that pulled it or that the registry took
since, and whether one pull was anonymous. A hit for anyone else is checked with the registry
first (a manifest HEAD with the caller's login, refused on 401/403 or when the registry cannot
answer); an image pulled anonymously is given to anyone with no request. The agent's `Run`
takes the cache as it is (`check_access=False`): the holder pulled the image, with its login,
before it runs it, and a RunRequest carries no login; of an unqualified name's candidates
it takes the one that pull resolved in this process, where there is one.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import sifroot
from .confine import UserNamespace
from .distribution import (
    DOCKER_MANIFESTS,
    OCI_MANIFEST,
    Manifest,
    RegistryClient,
    RegistryError,
    Unauthorized,
    valid_digest,
    valid_host,
    valid_name,
    valid_reference,
)
from .paths import remove_tree
from .sif import SifError

__all__ = ["Image", "ImageCache", "ImageError", "parse_reference"]

Progress = Callable[[str], None]

SIF_LAYER = "application/vnd.sylabs.sif.layer.v1.sif"
GiB = 2**30
_SALT = os.urandom(32)  # per process: the identities made with it mean nothing elsewhere
_ANYONE = ""  # the identity of a pull with no login


class ImageError(Exception):
    """A reference that cannot be parsed, or a pull that failed; says why."""


@dataclass(frozen=True, slots=True)
class Image:
    """An unpacked image: where its root filesystem is and what its config says."""

    reference: str  # fully qualified, docker://registry/repo:tag or @digest
    digest: str  # the manifest digest
    rootfs: Path
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir: str = ""
    cached: bool = False  # no pull was needed
    sif: Path | None = None  # set for oras:// images: the SIF file (rootfs: its root)
    env_scripts: str = ""  # a folder of scripts sourced before the command (SIF images)


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str
    repository: str
    tag: str = ""
    digest: str = ""

    def __str__(self) -> str:
        suffix = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"docker://{self.registry}/{self.repository}{suffix}"


def parse_reference(ref: str, search_registries: tuple[str, ...]) -> list[Reference]:
    """Candidates for `ref`, most likely first: one if qualified, one per search registry if not.

    `docker://alpine` has no registry; like podman's unqualified-search-registries, each
    configured registry is tried in turn (`docker.io` adds `library/` for official images).
    """
    if not ref.startswith("docker://"):
        scheme = ref.split("://", 1)[0] if "://" in ref else "none"
        raise ImageError(f"{ref!r}: scheme {scheme} is not supported; use docker:// or oras://")
    rest = ref.removeprefix("docker://")
    if not rest or rest.startswith("/") or " " in rest:
        raise ImageError(f"{ref!r} is not an image reference")
    name, digest = ([*rest.split("@", 1), ""])[:2]
    tag = ""
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    first, _, remainder = name.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        return [Reference(first, remainder, tag, digest)]
    if not search_registries:
        raise ImageError(f"{ref!r} names no registry and no search registries are configured")
    out = []
    for registry in search_registries:
        repo = f"library/{name}" if registry == "docker.io" and "/" not in name else name
        out.append(Reference(registry, repo, tag, digest))
    return out


@dataclass(frozen=True, slots=True)
class OrasReference:
    registry: str
    repository: str
    reference: str  # a tag or a sha256 digest


def parse_oras(ref: str) -> OrasReference:
    """`oras://HOST/REPO[:TAG][@sha256:...]`, each part checked as the distribution spec says."""
    target = ref.removeprefix("oras://")
    registry, _, rest = target.partition("/")
    if not rest or not ("." in registry or ":" in registry or registry == "localhost"):
        raise ImageError(f"{ref!r}: oras references name their registry (oras://HOST/REPO:TAG)")
    name, _, digest = rest.partition("@")
    tag = "latest"
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    reference = digest or tag
    if not valid_host(registry) or not valid_name(name) or not valid_reference(reference):
        raise ImageError(f"{ref!r} is not an oras reference (oras://HOST/REPO:TAG or @sha256:...)")
    return OrasReference(registry, name, reference)


@dataclass(slots=True)
class _Pull:
    who: str  # the identity of the login that pulls
    done: threading.Event = field(default_factory=threading.Event)
    result: Image | None = None
    error: Exception | None = None
    shown: bool = False  # `who` showed access to `result`: it pulled it, or the registry took it


class ImageCache:
    """Pulls, unpacks and remembers images for one agent."""

    def __init__(
        self,
        root: Path,
        search_registries: tuple[str, ...] = ("docker.io",),
        insecure_registries: tuple[str, ...] = (),
        userns: UserNamespace | None = None,
        *,
        max_sif_bytes: int = 64 * GiB,
        max_root_bytes: int = 64 * GiB,
    ) -> None:
        self.root = root
        self.search = search_registries
        self.insecure = set(insecure_registries)
        self.userns = userns
        self.max_sif_bytes = max_sif_bytes  # the largest SIF file an oras:// pull takes
        self.max_root_bytes = max_root_bytes  # the largest root a SIF may unpack to
        (root / "rootfs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pulls: dict[str, _Pull] = {}
        self._access: dict[str, set[str]] = {}  # reference -> identities shown access
        self._refs_file = root / "refs.json"
        # images by reference and manifest digest: what the blobs say, read once (a digest's
        # blobs never change)
        self._images: dict[tuple[str, str, bool], Image] = {}

    def _refs(self) -> dict[str, str]:
        try:
            return dict(json.loads(self._refs_file.read_text()))
        except (OSError, ValueError):
            return {}

    def _remember(self, reference: str, digest: str) -> None:
        refs = self._refs()
        refs[reference] = digest
        tmp = self._refs_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(refs, indent=1))
        os.replace(tmp, self._refs_file)

    def get(
        self,
        ref: str,
        credentials: tuple[str, str] | None = None,
        progress: Progress = lambda _: None,
        *,
        check_access: bool = True,
    ) -> Image:
        """The image for `ref`, pulled unless already cached; raises `ImageError`. A cached
        image that no login like `credentials` (nor an anonymous pull) has had is given only
        once the registry takes `credentials` for it, unless `check_access` is False."""
        if ref.startswith("oras://"):
            return self._get_sif(ref, credentials, progress, check_access)
        candidates = parse_reference(ref, self.search)
        if not check_access and len(candidates) > 1:
            # a Run takes the candidate its holder's pull resolved here (granted), never an
            # earlier one of the search that another agent of a shared folder left cached
            with self._lock:
                granted = [c for c in candidates if self._access.get(str(c))]
            candidates = granted or candidates
        errors = []
        for candidate in candidates:
            try:
                return self._get_one(candidate, credentials, progress, check_access)
            except ImageError as exc:
                errors.append(str(exc))
        raise ImageError("; ".join(errors))

    def _once(
        self,
        key: str,
        credentials: tuple[str, str] | None,
        cached: Callable[[], Image | None],
        pull: Callable[[], Image],
        check: Callable[[], None],
        progress: Progress,
        check_access: bool,
    ) -> Image:
        """The cached image, once this caller may have it, or one pull per key and login
        however many callers ask at once."""
        who = _identity(credentials)
        while True:
            flight: _Pull | None = None
            first = False
            with self._lock:
                hit = cached()
                if hit is None:
                    flight = self._pulls.get(key)
                    first = flight is None
                    if flight is None:
                        flight = self._pulls[key] = _Pull(who)
                known = not check_access or self._allowed(key, who)
            if hit is not None:
                if not known:
                    check()  # raises ImageError when the registry refuses this login
                    self._grant(key, who)
                return hit
            assert flight is not None
            if first:
                break
            progress(f"waiting for a pull of {key} already in progress")
            flight.done.wait()
            same = flight.who == who and (flight.shown or flight.error is not None)
            if same or not check_access:
                if flight.error is not None:
                    raise flight.error
                assert flight.result is not None
                return flight.result
            # another login pulled it: this caller is checked (a hit) or pulls itself
        try:
            with self._folder_lock():
                hit = cached()  # another agent sharing the folder pulled it meanwhile
                image = pull() if hit is None else hit
            if hit is not None and check_access:
                check()  # raises ImageError when the registry refuses this login
            flight.result = image
            if hit is None or check_access:  # pulled or checked: not a hit taken unchecked
                flight.shown = True
                self._grant(key, who)
            return image
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            flight.done.set()
            with self._lock:
                del self._pulls[key]

    @contextlib.contextmanager
    def _folder_lock(self) -> Iterator[None]:
        """One pull at a time in this folder, among every process that shares it (the OCI
        layout's index and refs.json are rewritten by each pull)."""
        with open(self.root / ".pull.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _allowed(self, key: str, who: str) -> bool:
        """Whether `who` may have `key` from the cache without asking (under the lock)."""
        known = self._access.get(key, set())
        return _ANYONE in known or who in known

    def _grant(self, key: str, who: str) -> None:
        with self._lock:
            self._access.setdefault(key, set()).add(who)

    def _check(
        self,
        key: str,
        host: str,
        repository: str,
        reference: str,
        accept: tuple[str, ...],
        credentials: tuple[str, str] | None,
    ) -> None:
        """Returns when the registry takes `credentials` (or none) for this image."""
        try:
            with self._client(host, credentials) as registry:
                registry.check(repository, reference, accept)
        except Unauthorized as exc:
            raise ImageError(f"pull of {key} failed: {_denied(str(exc), credentials)}") from None
        except RegistryError as exc:
            raise ImageError(
                f"pull of {key} failed: its cached copy is given only to a login the registry "
                f"takes, and the registry could not say: {exc}"
            ) from None

    def _client(self, host: str, credentials: tuple[str, str] | None) -> RegistryClient:
        try:
            return RegistryClient(host, credentials, insecure=host in self.insecure)
        except RegistryError as exc:
            raise ImageError(str(exc)) from None

    def _get_one(
        self,
        ref: Reference,
        credentials: tuple[str, str] | None,
        progress: Progress,
        check_access: bool,
    ) -> Image:
        key = str(ref)

        def cached() -> Image | None:
            digest = self._refs().get(key)
            if digest and self._rootfs(digest).is_dir():
                return self._image(key, digest, cached=True)
            return None

        def check() -> None:
            reference = ref.digest or ref.tag or "latest"
            self._check(key, ref.registry, ref.repository, reference, DOCKER_MANIFESTS, credentials)

        def pull() -> Image:
            return self._pull(ref, credentials, progress)

        return self._once(key, credentials, cached, pull, check, progress, check_access)

    def _get_sif(
        self,
        ref: str,
        credentials: tuple[str, str] | None,
        progress: Progress,
        check_access: bool,
    ) -> Image:
        """An `oras://REGISTRY/REPO[:TAG|@DIGEST]` artifact: its SIF file, cached by digest."""
        oras = parse_oras(ref)

        def cached() -> Image | None:
            digest = self._refs().get(ref)
            if not digest or not valid_digest(digest) or not self._sif_path(digest).is_file():
                return None
            if not self._rootfs(digest).is_dir():
                return None
            return self._sif_image(ref, digest, cached=True)

        def check() -> None:
            accept = (OCI_MANIFEST,)
            self._check(ref, oras.registry, oras.repository, oras.reference, accept, credentials)

        def pull() -> Image:
            progress(f"pulling {ref}")
            try:
                with self._client(oras.registry, credentials) as registry:
                    manifest = registry.manifest(oras.repository, oras.reference, (OCI_MANIFEST,))
                    digest, size = self._sif_layer(ref, manifest)
                    path = self._sif_path(digest)
                    if not _has_digest(path, digest):
                        self._fetch_sif(registry, oras.repository, ref, digest, size, progress)
            except Unauthorized as exc:
                why = _denied(str(exc), credentials)
                raise ImageError(f"pull of {ref} failed: {why}") from None
            except RegistryError as exc:
                raise ImageError(f"pull of {ref} failed: {exc}") from None
            self._unpack_sif(ref, path, digest, progress)
            self._remember(ref, digest)
            progress(f"pulled {ref} ({digest})")
            return self._sif_image(ref, digest, cached=False)

        return self._once(ref, credentials, cached, pull, check, progress, check_access)

    def _sif_layer(self, ref: str, manifest: Manifest) -> tuple[str, int]:
        """The digest and size of the manifest's one SIF layer; anything else is refused."""
        try:
            body = manifest.json()
        except ValueError:
            body = None
        layers = body.get("layers") if isinstance(body, dict) else None
        if not isinstance(layers, list):
            raise ImageError(f"pull of {ref} failed: its manifest is not an OCI image manifest")
        kinds = [str(x.get("mediaType")) if isinstance(x, dict) else "?" for x in layers]
        if kinds != [SIF_LAYER]:
            held = ", ".join(_printable(k, 80) for k in kinds[:5]) + (", ..." * (len(kinds) > 5))
            raise ImageError(
                f"pull of {ref} failed: it is not a SIF image: its manifest must hold exactly "
                f"one layer of type {SIF_LAYER}, and holds {held or 'none'}"
            )
        digest, size = layers[0].get("digest"), layers[0].get("size")
        if not isinstance(digest, str) or not valid_digest(digest):
            size = None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(
                f"pull of {ref} failed: its SIF layer names no valid sha256 digest and size"
            )
        assert isinstance(digest, str)
        if size > self.max_sif_bytes:
            raise ImageError(
                f"pull of {ref} failed: its SIF is {_human(size)}, more than the "
                f"{_human(self.max_sif_bytes)} this node takes"
            )
        return digest, size

    def _fetch_sif(
        self,
        registry: RegistryClient,
        repository: str,
        ref: str,
        digest: str,
        size: int,
        progress: Progress,
    ) -> None:
        """Stream the blob into staging/, hashing it, and file it under `digest` only when
        its bytes are `size` long and have that digest."""
        staging = self.root / "staging"
        staging.mkdir(mode=0o700, exist_ok=True)
        free = shutil.disk_usage(staging).free
        if size > free:
            raise ImageError(
                f"pull of {ref} failed: its SIF is {_human(size)}, more than the {_human(free)} "
                "free where images are kept"
            )
        fd, name = tempfile.mkstemp(dir=staging, prefix="sif-", suffix=".part")
        part = Path(name)
        try:
            sha = hashlib.sha256()
            got = 0
            step = max(size // 10, 256 * 2**20)
            with os.fdopen(fd, "wb") as out, registry.blob(repository, digest) as (length, chunks):
                if length is not None and length != size:
                    raise ImageError(
                        f"pull of {ref} failed: the registry sends {length} bytes for its SIF, "
                        f"whose manifest declares {size}"
                    )
                for chunk in chunks:
                    if got // step != (got + len(chunk)) // step:
                        progress(f"received {_human(got + len(chunk))} of {_human(size)}")
                    got += len(chunk)
                    if got > size:
                        raise ImageError(
                            f"pull of {ref} failed: the registry sent more than the {size} bytes "
                            "its manifest declares"
                        )
                    sha.update(chunk)
                    out.write(chunk)
            if got != size:
                raise ImageError(
                    f"pull of {ref} failed: the registry sent {got} of the {size} bytes of its SIF"
                )
            received = f"sha256:{sha.hexdigest()}"
            if received != digest:
                raise ImageError(
                    f"pull of {ref} failed: the SIF received has digest {received}, not the "
                    f"{digest} its manifest names"
                )
            part.chmod(0o644)
            self._sif_path(digest).parent.mkdir(exist_ok=True)
            os.replace(part, self._sif_path(digest))
        finally:
            part.unlink(missing_ok=True)

    def _sif_path(self, digest: str) -> Path:
        return self.root / "sif" / f"{_hex(digest)}.sif"

    def _unpack_sif(self, ref: str, path: Path, digest: str, progress: Progress) -> None:
        """The SIF's root file system in the cache, unless it is there already."""
        target = self._rootfs(digest)
        if target.is_dir():
            return
        progress(f"unpacking {digest[:19]}")
        try:
            sifroot.unpack(path, target, self.userns, self.max_root_bytes)
        except SifError as exc:
            path.unlink(missing_ok=True)
            raise ImageError(f"{ref} cannot run here: {exc}") from None

    def _sif_image(self, ref: str, digest: str, *, cached: bool) -> Image:
        rootfs = self._rootfs(digest)
        found = sifroot.defaults(rootfs)
        return Image(
            reference=ref,
            digest=digest,
            rootfs=rootfs,
            env=(f"APPTAINER_CONTAINER={ref}", f"SINGULARITY_CONTAINER={ref}"),
            entrypoint=found.entrypoint,
            cached=cached,
            sif=self._sif_path(digest),
            env_scripts=found.env_scripts,
        )

    def _pull(
        self, ref: Reference, credentials: tuple[str, str] | None, progress: Progress
    ) -> Image:
        key = str(ref)
        tag = hashlib.sha256(key.encode()).hexdigest()[:32]  # a valid OCI ref name per reference
        layout = self.root / "oci"
        cmd = ["skopeo", "copy", "--retry-times", "2", key, f"oci:{layout}:{tag}"]
        if ref.registry in self.insecure:
            cmd.insert(2, "--src-tls-verify=false")
        auth = _auth_file(ref.registry, credentials) if credentials is not None else None
        if auth is not None:
            cmd[2:2] = ["--src-authfile", f"/proc/self/fd/{auth}"]  # skopeo's own fd `auth`
        progress(f"pulling {key}")
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                pass_fds=() if auth is None else (auth,),
            )
        finally:
            if auth is not None:
                os.close(auth)
        assert proc.stdout is not None
        assert proc.stderr is not None
        for line in proc.stdout:
            if line.strip():
                progress(line.strip())
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        if proc.wait() != 0:
            raise ImageError(f"pull of {key} failed: {_refusal(_reason(err), credentials)}")
        digest = self._manifest_digest(layout, tag)
        target = self._rootfs(digest)
        if not target.is_dir():
            progress(f"unpacking {digest[:19]}")
            staging = Path(tempfile.mkdtemp(dir=self.root / "rootfs", prefix=".unpack-"))
            shutil.rmtree(staging)
            shift = self.userns.umoci_flags() if self.userns is not None else []
            result = subprocess.run(
                ["umoci", "raw", "unpack", *shift, "--image", f"{layout}:{tag}", str(staging)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                remove_tree(staging)
                raise ImageError(f"cannot unpack {key}: {_reason(result.stderr)}")
            owner = self.userns.root if self.userns is not None else (0, 0)
            add_mount_points(staging, owner)
            os.replace(staging, target)
        self._remember(key, digest)
        progress(f"pulled {key} ({digest})")
        return self._image(key, digest, cached=False)

    def _manifest_digest(self, layout: Path, tag: str) -> str:
        index = json.loads((layout / "index.json").read_text())
        for m in index.get("manifests", []):
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                return str(m["digest"])
        raise ImageError(f"the pulled image is missing from {layout}/index.json")

    def _image(self, key: str, digest: str, *, cached: bool) -> Image:
        known = self._images.get((key, digest, cached))
        if known is None:
            known = self._images[key, digest, cached] = self._read_image(key, digest, cached)
        return known

    def _read_image(self, key: str, digest: str, cached: bool) -> Image:
        blobs = self.root / "oci" / "blobs" / "sha256"
        manifest = json.loads((blobs / _hex(digest)).read_text())
        config = json.loads((blobs / _hex(manifest["config"]["digest"])).read_text())
        c = config.get("config") or {}
        return Image(
            reference=key,
            digest=digest,
            rootfs=self._rootfs(digest),
            env=tuple(c.get("Env") or ()),
            entrypoint=tuple(c.get("Entrypoint") or ()),
            cmd=tuple(c.get("Cmd") or ()),
            workdir=c.get("WorkingDir") or "",
            cached=cached,
        )

    def _rootfs(self, digest: str) -> Path:
        suffix = f"-u{self.userns.base}" if self.userns is not None else ""
        return self.root / "rootfs" / f"{_hex(digest)}{suffix}"


MOUNT_POINTS = ("dev", "proc", "sys")  # what every container start mounts on


def add_mount_points(rootfs: Path, owner: tuple[int, int]) -> None:
    """The folders a runtime mounts /dev, /proc and /sys on, made once in the image's root
    where it lacks them, rather than by every start of it (in its copy-on-write layer). A name
    the image already uses (as a link, say) is left alone."""
    top = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name in MOUNT_POINTS:
            try:
                os.mkdir(name, 0o755, dir_fd=top)
            except FileExistsError:
                continue
            os.chown(name, *owner, dir_fd=top, follow_symlinks=False)
    finally:
        os.close(top)


def _hex(digest: str) -> str:
    return digest.split(":", 1)[-1]


def _auth_file(registry: str, credentials: tuple[str, str]) -> int:
    """A containers-auth.json for `registry` in an anonymous memory file (memfd): the
    credentials touch no disk, and the file is gone once skopeo and we close it."""
    token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
    fd = os.memfd_create("squall-registry-auth", os.MFD_CLOEXEC)
    os.write(fd, json.dumps({"auths": {registry: {"auth": token}}}).encode())
    return fd


def _identity(credentials: tuple[str, str] | None) -> str:
    """Who a login is, for this process only: a keyed hash of user and password."""
    if credentials is None:
        return _ANYONE
    user, password = credentials
    message = f"{len(user)}:{user}:{password}".encode()
    return hmac.new(_SALT, message, hashlib.sha256).hexdigest()


def _has_digest(path: Path, digest: str) -> bool:
    """Whether `path` is a file whose bytes have `digest` (a SIF already received)."""
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(2**20):
                sha.update(chunk)
    except OSError:
        return False
    return f"sha256:{sha.hexdigest()}" == digest


def _printable(text: str, most: int) -> str:
    """What a registry wrote, as one short line of printable characters."""
    line = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    return line if len(line) <= most else line[: most - 3] + "..."


def _human(size: int) -> str:
    return f"{size / GiB:.1f} GiB" if size >= GiB else f"{size / 2**20:.1f} MiB"


def _denied(reason: str, credentials: tuple[str, str] | None) -> str:
    if credentials is None:
        return f"the registry requires authentication and no credentials were given ({reason})"
    return f"authentication failed: the registry refused the credentials ({reason})"


def _refusal(reason: str, credentials: tuple[str, str] | None) -> str:
    """The registry's reason, saying so when it is about the credentials."""
    if "unauthorized" not in reason.lower() and "authentication required" not in reason.lower():
        return reason
    return _denied(reason, credentials)


_GO_QUOTED = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
_GO_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))")
_GO_CHARS = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _unquote(text: str) -> str:
    """A Go-quoted string's content (`%q`, as logrus writes msg="..."), unescaped."""

    def one(m: re.Match[str]) -> str:
        if m[1] or m[2] or m[3]:
            return chr(int(m[1] or m[2] or m[3], 16))
        return _GO_CHARS.get(m[4], m[4])

    return _GO_ESCAPE.sub(one, text)


def _reason(stderr: str) -> str:
    """skopeo's last error line, without its log prefix and quoting, as one line."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    if not lines:
        return "no error output"
    last = lines[-1]
    quoted = _GO_QUOTED.search(last)
    if quoted is not None:
        last = _unquote(quoted[1])
    elif 'msg="' in last:
        last = last.split('msg="', 1)[1].rstrip('"')
    return " ".join(last.split())
