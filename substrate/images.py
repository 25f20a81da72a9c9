"""The node's image cache: `docker://` references pulled with skopeo and unpacked with umoci;
`oras://` references (Apptainer SIF files in an OCI registry) pulled with the oras SDK, and
their squashfs root file system extracted (`sifroot.py`) so that crun runs them like the rest.

Layout under `<data>/images/`:
    oci/          one OCI image layout holding every pulled image (blobs shared by digest)
    rootfs/<d>/   the unpacked root filesystem of the manifest (or SIF blob) with digest <d>,
                  its owners shifted into the jobs' user namespace (`<d>-u<base>`) when
                  there is one
    sif/<d>.sif   a SIF file, by the digest of its blob (what Apptainer runs, where chosen)
    refs.json     resolved reference -> digest (a pulled tag is reused, not re-pulled)

Concurrent pulls of one reference happen once: later callers wait for the first and share
its result. Credentials go to skopeo in an auth file that lives only in memory (a memfd,
read through /proc/self/fd), never on disk or a command line; to oras by its basic auth.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import sifroot
from .confine import UserNamespace
from .paths import remove_tree
from .sif import SifError

__all__ = ["Image", "ImageCache", "ImageError", "parse_reference"]

Progress = Callable[[str], None]


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


@dataclass(slots=True)
class _Pull:
    done: threading.Event = field(default_factory=threading.Event)
    result: Image | None = None
    error: Exception | None = None


class ImageCache:
    """Pulls, unpacks and remembers images for one agent."""

    def __init__(
        self,
        root: Path,
        search_registries: tuple[str, ...] = ("docker.io",),
        insecure_registries: tuple[str, ...] = (),
        userns: UserNamespace | None = None,
    ) -> None:
        self.root = root
        self.search = search_registries
        self.insecure = set(insecure_registries)
        self.userns = userns
        (root / "rootfs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pulls: dict[str, _Pull] = {}
        self._refs_file = root / "refs.json"

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
    ) -> Image:
        """The image for `ref`, pulled unless already cached; raises `ImageError`."""
        if ref.startswith("oras://"):
            return self._get_sif(ref, credentials, progress)
        errors = []
        for candidate in parse_reference(ref, self.search):
            try:
                return self._get_one(candidate, credentials, progress)
            except ImageError as exc:
                errors.append(str(exc))
        raise ImageError("; ".join(errors))

    def _once(
        self,
        key: str,
        cached: Callable[[], Image | None],
        pull: Callable[[], Image],
        progress: Progress,
    ) -> Image:
        """The cached image, or one pull per key however many callers ask at once."""
        with self._lock:
            hit = cached()
            if hit is not None:
                return hit
            flight = self._pulls.get(key)
            first = flight is None
            if first:
                flight = self._pulls[key] = _Pull()
        assert flight is not None
        if not first:
            progress(f"waiting for a pull of {key} already in progress")
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            return flight.result
        try:
            flight.result = pull()
            return flight.result
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            flight.done.set()
            with self._lock:
                del self._pulls[key]

    def _get_one(
        self, ref: Reference, credentials: tuple[str, str] | None, progress: Progress
    ) -> Image:
        key = str(ref)

        def cached() -> Image | None:
            digest = self._refs().get(key)
            if digest and self._rootfs(digest).is_dir():
                return self._image(key, digest, cached=True)
            return None

        return self._once(key, cached, lambda: self._pull(ref, credentials, progress), progress)

    def _get_sif(self, ref: str, credentials: tuple[str, str] | None, progress: Progress) -> Image:
        """An `oras://REGISTRY/REPO[:TAG|@DIGEST]` artifact: its SIF file, cached by digest."""
        target = ref.removeprefix("oras://")
        registry, _, repository = target.partition("/")
        if not repository or not ("." in registry or ":" in registry or registry == "localhost"):
            raise ImageError(f"{ref!r}: oras references name their registry (oras://HOST/REPO:TAG)")

        def cached() -> Image | None:
            digest = self._refs().get(ref)
            path = self.root / "sif" / f"{_hex(digest)}.sif" if digest else None
            if digest and path is not None and path.is_file() and self._rootfs(digest).is_dir():
                return self._sif_image(ref, digest, cached=True)
            return None

        def pull() -> Image:
            import oras.client  # the oras SDK loads only when an oras:// image is pulled

            client = oras.client.OrasClient(hostname=registry, insecure=registry in self.insecure)
            if credentials is not None:
                client.set_basic_auth(*credentials)
            progress(f"pulling {ref}")
            staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".oras-"))
            try:
                manifest = client.get_manifest(target)
                layers = manifest.get("layers") or []
                if not layers:
                    raise ImageError(f"{ref} holds no file")
                files = client.pull(target=target, outdir=str(staging))
                digest = str(layers[0]["digest"])
                (self.root / "sif").mkdir(exist_ok=True)
                path = self.root / "sif" / f"{_hex(digest)}.sif"
                os.replace(files[0], path)
            except ImageError:
                raise
            except Exception as exc:  # the SDK raises ValueError and requests' errors
                raise ImageError(f"pull of {ref} failed: {exc}") from None
            finally:
                remove_tree(staging)
            self._unpack_sif(ref, path, digest, progress)
            self._remember(ref, digest)
            progress(f"pulled {ref} ({digest})")
            return self._sif_image(ref, digest, cached=False)

        return self._once(ref, cached, pull, progress)

    def _unpack_sif(self, ref: str, path: Path, digest: str, progress: Progress) -> None:
        """The SIF's root file system in the cache, unless it is there already."""
        target = self._rootfs(digest)
        if target.is_dir():
            return
        progress(f"unpacking {digest[:19]}")
        try:
            sifroot.unpack(path, target, self.userns)
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
            sif=self.root / "sif" / f"{_hex(digest)}.sif",
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


def _hex(digest: str) -> str:
    return digest.split(":", 1)[-1]


def _auth_file(registry: str, credentials: tuple[str, str]) -> int:
    """A containers-auth.json for `registry` in an anonymous memory file (memfd): the
    credentials touch no disk, and the file is gone once skopeo and we close it."""
    token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
    fd = os.memfd_create("squall-registry-auth", os.MFD_CLOEXEC)
    os.write(fd, json.dumps({"auths": {registry: {"auth": token}}}).encode())
    return fd


def _refusal(reason: str, credentials: tuple[str, str] | None) -> str:
    """The registry's reason, saying so when it is about the credentials."""
    if "unauthorized" not in reason.lower() and "authentication required" not in reason.lower():
        return reason
    if credentials is None:
        return f"the registry requires authentication and no credentials were given ({reason})"
    return f"authentication failed: the registry refused the credentials ({reason})"


def _reason(stderr: str) -> str:
    """skopeo's last error line, without its log prefix."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    if not lines:
        return "no error output"
    last = lines[-1]
    marker = 'msg="'
    if marker in last:
        last = last.split(marker, 1)[1].rstrip('"')
    return last
