"""`squall image build`: the node image from its recipe, as an OCI image.

Steps: the agent's wheels (this checkout's `squall` wheel and its dependencies at the
versions installed where the build runs, from the package index); the root file system from
Debian's packages (mmdebstrap, as a tar whose file times are the build's fixed epoch); the
recipe's overlay; the agent in a venv; one OCI layer and a config with fixed dates (umoci).
Fixed dates and file times are meant to make two builds of one recipe from the same
package versions give the same digest (bench/node_image.py checks it; not yet measured).

Built images are kept in a cache folder named by the hash of everything a build reads
(`Recipe.key`), so a second build of an unchanged recipe takes no time. A build is made in a
temporary folder beside the cache and renamed into it whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from .recipe import Recipe, RecipeError, checkout

__all__ = [
    "BUILD_VERSION",
    "EPOCH",
    "BuiltImage",
    "build",
    "cached_image",
    "default_cache",
    "push",
]

BUILD_VERSION = "2"  # raise when the steps below change what a build makes
# the file times and dates of every build (2025-12-01T00:00:00Z): the same input gives the
# same digest
EPOCH = 1764547200
TOOLS = {"mmdebstrap": "mmdebstrap", "umoci": "umoci"}
# the agent's sources: what goes into its wheel
_SOURCES = ("api", "cli", "federate", "infra", "orchestrator", "substrate")

Say = Callable[[str], None]


def _quiet(line: str) -> None:
    del line


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "squall" / "node-images"


@dataclass(frozen=True, slots=True)
class BuiltImage:
    """A built node image: its OCI layout (one image, tagged `tag`) and what it is."""

    layout: Path
    tag: str
    digest: str  # the manifest's, sha256:...
    size: int  # bytes of its compressed layer
    key: str  # the recipe hash it was built from
    layers: tuple[str, ...]
    cached: bool = False  # taken from the cache, not built now
    seconds: float = 0.0  # how long the build (or the cache lookup) took

    @property
    def reference(self) -> str:
        return f"{self.layout}:{self.tag}"

    def as_dict(self) -> dict[str, object]:
        return {
            "layout": str(self.layout),
            "tag": self.tag,
            "digest": self.digest,
            "size_bytes": self.size,
            "key": self.key,
            "layers": list(self.layers),
            "cached": self.cached,
            "seconds": round(self.seconds, 2),
        }


def _source_hash(root: Path) -> str:
    """The agent's sources and its dependency pins: what its wheels are made of."""
    digest = hashlib.sha256()
    for package in _SOURCES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in {".py", ".json", ".proto", ".pyi"} and "__pycache__" not in str(path):
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    digest.update((root / "pyproject.toml").read_bytes())
    return digest.hexdigest()


def _constraints() -> str:
    """The versions installed where this build runs: the image's agent gets the same ones."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RecipeError(f"pip freeze failed: {done.stderr.strip()[-500:]}")
    return "\n".join(
        line for line in done.stdout.splitlines() if line and not line.startswith("squall")
    )


def _missing_tools() -> list[str]:
    return [package for tool, package in TOOLS.items() if shutil.which(tool) is None]


def cached_image(
    recipe: Recipe, layers: tuple[str, ...] = (), cache: Path | None = None
) -> BuiltImage | None:
    """The cache's build of `recipe` with `layers` as the checkout is now, if there is one."""
    key = _key(recipe, layers, checkout(), _constraints())
    return _from_cache((cache or default_cache()) / key, recipe, key, layers)


def _key(recipe: Recipe, layers: tuple[str, ...], root: Path, constraints: str) -> str:
    return recipe.key(layers, BUILD_VERSION, str(EPOCH), _source_hash(root), constraints)[:24]


def _from_cache(
    folder: Path, recipe: Recipe, key: str, layers: tuple[str, ...]
) -> BuiltImage | None:
    layout = folder / "oci"
    facts = folder / "image.json"
    if not (layout / "index.json").exists() or not facts.exists():
        return None
    # what a node boots and root exports: only from a cache no one but root could have
    # planted or changed, and only the image its facts name
    for path in (folder.parent, folder, layout, layout / "blobs", facts):
        seen = path.lstat()
        if stat.S_ISLNK(seen.st_mode) or seen.st_uid != 0 or seen.st_mode & 0o022:
            raise RecipeError(
                f"{path} is not root's alone (a link, another owner, or writable by others): "
                "a cached node image must be; remove it, or give a --cache only root writes"
            )
    info = json.loads(facts.read_text())
    digest, _ = _manifest(layout, recipe.name)
    if digest != info["digest"]:
        raise RecipeError(f"{folder} holds {digest}, not the {info['digest']} it says: remove it")
    return BuiltImage(
        layout, recipe.name, info["digest"], info["size"], key, tuple(info["layers"]), True
    )


def build(
    recipe: Recipe,
    layers: tuple[str, ...] = (),
    *,
    cache: Path | None = None,
    say: Say = _quiet,
    log: Path | None = None,
) -> BuiltImage:
    """The node image of `recipe` with `layers`: from the cache when it has this very
    build, else built now (minutes). RecipeError says what is missing or what failed."""
    started = time.monotonic()
    recipe.layer_list(layers)  # unknown layers fail before anything runs
    root = checkout()
    missing = _missing_tools()
    if missing:
        raise RecipeError(
            f"building a node image needs {', '.join(missing)} "
            "(apt-get install them, or scripts/setup.sh --runtime)"
        )
    if os.geteuid() != 0:
        raise RecipeError(
            "building a node image needs root (its files belong to root and other users, "
            "and the agent is installed inside it)"
        )
    constraints = _constraints()
    key = _key(recipe, layers, root, constraints)
    cache = cache or default_cache()
    folder = cache / key
    found = _from_cache(folder, recipe, key, layers)
    if found is not None:
        say(f"cached: {found.digest} ({key})")
        return _took(found, started)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        work = Path(tmp)
        say("the agent's wheels (this checkout's squall and its pinned dependencies)")
        wheels = _wheels(root, constraints, work)
        rootfs = work / "rootfs.tar"
        say(
            f"the root file system: Debian {recipe.distribution.suite}, "
            f"{len(recipe.all_packages(layers))} packages"
        )
        run_tool(_mmdebstrap(recipe, layers, wheels, rootfs, work), log=log)
        say("the OCI image")
        staged = work / "oci"
        _oci(recipe, rootfs, staged, key, log)
        digest, size = _manifest(staged, recipe.name)
        (work / "image.json").write_text(
            json.dumps({"digest": digest, "size": size, "layers": list(layers)}) + "\n"
        )
        built = work / "built"
        built.mkdir()
        staged.rename(built / "oci")
        (work / "image.json").rename(built / "image.json")
        if folder.exists():  # a build of the same key finished meanwhile: keep that one
            shutil.rmtree(built)
        else:
            built.rename(folder)
    image = _from_cache(folder, recipe, key, layers)
    assert image is not None
    return _took(replace(image, cached=False), started)


def _took(image: BuiltImage, started: float) -> BuiltImage:
    return replace(image, seconds=time.monotonic() - started)


def _wheels(root: Path, constraints: str, work: Path) -> Path:
    folder = work / "wheels"
    pins = work / "constraints.txt"
    pins.write_text(constraints + "\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # from a copy of the sources: a build writes build/ and *.egg-info where it runs, and the
    # checkout is not the build's to write (nor is anything else in it the wheel's)
    source = work / "source"
    for name in _SOURCES:
        shutil.copytree(
            root / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, source / name)
    run_tool([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(folder), str(source)])
    (wheel,) = folder.glob("squall-*.whl")
    run_tool(
        [
            *pip,
            "download",
            "-d",
            str(folder),
            "--only-binary=:all:",
            "-c",
            str(pins),
            str(wheel),
        ]
    )
    return folder


def _mmdebstrap(
    recipe: Recipe, layers: tuple[str, ...], wheels: Path, rootfs: Path, work: Path
) -> list[str]:
    dist = recipe.distribution
    mirror = os.environ.get("SQUALL_DEBIAN_MIRROR") or dist.mirror
    venv = recipe.agent
    hooks: list[str] = []
    overlay = recipe.overlay_path
    if overlay is not None:
        hooks.append(f"sync-in {overlay} /")
        # the copy keeps the checkout's owners and modes: root's, whoever cloned it
        hooks.append('chown 0:0 "$1" && chmod 0755 "$1"')
        for path in sorted(overlay.rglob("*")):
            inside = shlex.quote(str(path.relative_to(overlay)))
            mode = "0755" if path.is_dir() else "0644"
            hooks.append(f'chown -h 0:0 "$1"/{inside} && chmod {mode} "$1"/{inside}')
    hooks += [
        'mkdir -p "$1/tmp/wheels"',
        f"sync-in {wheels} /tmp/wheels",
        f'chroot "$1" python3 -m venv {venv}',
        f'chroot "$1" {venv}/bin/pip install -q --no-index --no-cache-dir '
        "--disable-pip-version-check --find-links /tmp/wheels squall",
        f'ln -sf {venv}/bin/squall "$1/usr/local/bin/squall"',
        'rm -rf "$1/tmp/wheels"',
    ]
    if recipe.enable:
        hooks.append(f'chroot "$1" systemctl enable {" ".join(recipe.enable)}')
    hooks += [
        # what would differ from node to node, or from build to build; mmdebstrap copies the
        # build machine's resolver and hostname in: a node resolves through systemd-resolved
        # (the cloud's DNS from DHCP) and gets its name from its boot data
        ': > "$1/etc/machine-id"',
        'ln -sf ../run/systemd/resolve/stub-resolv.conf "$1/etc/resolv.conf"',
        'echo localhost > "$1/etc/hostname"',
        'rm -f "$1/var/lib/dbus/machine-id" "$1"/boot/*.dpkg-bak',
        'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*',
        'find "$1/var/cache/ldconfig" -type f -delete',
    ]
    cmd = [
        "mmdebstrap",
        "--variant=apt",
        f"--architectures={recipe.architecture}",
        f"--components={','.join(recipe.components(layers))}",
        f"--include={','.join(recipe.all_packages(layers))}",
    ]
    cmd += [f"--dpkgopt=path-exclude={pattern}" for pattern in recipe.exclude]
    cmd += [f"--customize-hook={hook}" for hook in hooks]
    cmd += [dist.suite, str(rootfs), mirror]
    for layer in recipe.layer_list(layers):
        for repo in layer.repositories:
            key = _fetch_key(repo.key, work)
            line = f"deb [signed-by={key}] {repo.url} {repo.suite} {' '.join(repo.components)}"
            cmd.append(line.strip())
    return cmd


def _fetch_key(url: str, work: Path) -> Path:
    """The signing key of a layer's repository, fetched now; RecipeError when it cannot be."""
    try:
        response = httpx.get(url, follow_redirects=True, timeout=30)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise RecipeError(f"cannot fetch the repository key {url}: {exc}") from None
    path = work / f"key-{hashlib.sha256(url.encode()).hexdigest()[:12]}.asc"
    path.write_bytes(response.content)
    return path


def _oci(recipe: Recipe, rootfs: Path, staged: Path, key: str, log: Path | None) -> None:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(EPOCH))
    image = f"{staged}:{recipe.name}"
    for step in (
        ["umoci", "init", "--layout", str(staged)],
        ["umoci", "new", "--image", image],
        [
            "umoci",
            "raw",
            "add-layer",
            "--history.created",
            created,
            "--history.created_by",
            f"squall image build ({recipe.name})",
            "--image",
            image,
            str(rootfs),
        ],
        [
            "umoci",
            "config",
            "--image",
            image,
            "--created",
            created,
            "--no-history",
            "--config.cmd",
            "/sbin/init",
            "--config.env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--os",
            "linux",
            "--architecture",
            recipe.architecture,
            "--config.label",
            f"org.opencontainers.image.title={recipe.name}",
            "--config.label",
            f"io.squall.recipe={key}",
        ],
        ["umoci", "gc", "--layout", str(staged)],
    ):
        run_tool(step, log=log)


def _manifest(layout: Path, tag: str) -> tuple[str, int]:
    """The digest of the manifest tagged `tag` in `layout`, and its layers' size."""
    index = json.loads((layout / "index.json").read_text())
    for entry in index.get("manifests", []):
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            digest = entry["digest"]
            algo, hexdigest = digest.split(":", 1)
            blob = (layout / "blobs" / algo / hexdigest).read_bytes()
            if algo != "sha256" or hashlib.sha256(blob).hexdigest() != hexdigest:
                raise RecipeError(f"{layout}: the manifest {digest} does not match its digest")
            manifest = json.loads(blob)
            return digest, sum(layer["size"] for layer in manifest["layers"])
    raise RecipeError(f"{layout} has no image tagged {tag}")


def push(image: BuiltImage, destination: str, *, insecure: bool = False) -> str:
    """Push `image` to `destination` (REGISTRY/NAME[:TAG]) with skopeo; the digest the
    registry holds it under (the same as the layout's)."""
    if shutil.which("skopeo") is None:
        raise RecipeError("pushing a node image needs skopeo (apt-get install skopeo)")
    with tempfile.NamedTemporaryFile(suffix=".digest") as out:
        cmd = [
            "skopeo",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--digestfile",
            out.name,
            f"oci:{image.reference}",
            f"docker://{destination}",
        ]
        if insecure:
            cmd.insert(2, "--dest-tls-verify=false")
        run_tool(cmd)
        return Path(out.name).read_text().strip()


def run_tool(
    cmd: list[str],
    *,
    log: Path | None = None,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run one tool of the build at the build's fixed time (SOURCE_DATE_EPOCH, and `env` on
    top of this process's); its output to `log` (or nowhere); RecipeError with the end of
    what it said on stderr when it fails."""
    full = {**os.environ, **(env or {}), "SOURCE_DATE_EPOCH": str(EPOCH)}
    out = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        done = subprocess.run(
            cmd, input=stdin, stdout=out, stderr=subprocess.PIPE, text=True, check=False, env=full
        )
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    if done.returncode != 0:
        raise RecipeError(f"{Path(cmd[0]).name} failed: {done.stderr.strip()[-2000:]}")
