"""Test images and a registry, made here: busybox-static in an OCI image built with umoci,
served by Debian's docker-registry on 127.0.0.1 and pushed there with skopeo."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REQUIRED = ("umoci", "skopeo", "docker-registry", "bwrap", "crun", "busybox")


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED if shutil.which(tool) is None]


def busybox_root(rootfs: Path) -> Path:
    """A root file system at `rootfs`: busybox-static, its applets, /etc/passwd, /tmp."""
    for d in ("bin", "tmp", "etc", "root", "www"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    busybox = Path(shutil.which("busybox") or "/bin/busybox").resolve()
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        link = rootfs / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    # an absolute link, as images hold them: followed on the host, it would lead to the host's /
    (rootfs / "etc" / "escape").symlink_to("/")
    (rootfs / "tmp").chmod(0o1777)
    return rootfs


def build_busybox_image(work: Path, tag: str = "1.36") -> Path:
    """An OCI layout at work/oci holding a busybox image (one layer, cmd /bin/sh)."""
    rootfs = busybox_root(work / "rootfs")
    layer = work / "rootfs.tar"
    with tarfile.open(layer, "w") as tar:
        tar.add(rootfs, arcname=".")
    layout = work / "oci"
    image = f"{layout}:{tag}"
    for cmd in (
        ["umoci", "init", "--layout", str(layout)],
        ["umoci", "new", "--image", image],
        ["umoci", "raw", "add-layer", "--image", image, str(layer)],
        [
            "umoci",
            "config",
            "--image",
            image,
            "--config.cmd",
            "/bin/sh",
            "--config.env",
            "PATH=/bin",
            "--config.env",
            "IMAGE_VAR=from-image",
            "--config.workingdir",
            "/",
            "--os",
            "linux",
            "--architecture",
            "amd64",
        ],
        ["umoci", "gc", "--layout", str(layout)],
    ):
        subprocess.run(cmd, check=True, capture_output=True)
    return layout


def self_signed_certificate(work: Path, name: str, ip: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate and key for the address `ip`, made with openssl, valid for a day."""
    cert, key = work / f"{name}.crt", work / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={ip}",
            "-addext",
            f"subjectAltName=IP:{ip}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    """docker-registry serving from a temporary folder on 127.0.0.1.

    With `credentials`, it serves HTTPS (a certificate made here) and requires basic auth
    against an htpasswd file (bcrypt), as the registry's htpasswd backend must be used.
    """

    def __init__(self, work: Path, credentials: tuple[str, str] | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.credentials = credentials
        http = f"addr: {self.address}"
        auth = ""
        if credentials is not None:
            cert, key = self_signed_certificate(work, "tls")
            http += f", tls: {{certificate: {cert}, key: {key}}}"
            htpasswd = work / "htpasswd"
            htpasswd.write_text(f"{credentials[0]}:{_bcrypt(credentials[1])}\n")
            auth = f"auth: {{htpasswd: {{realm: squall-test, path: {htpasswd}}}}}\n"
        config = work / "registry.yml"
        config.write_text(
            "version: 0.1\nlog: {level: error}\n"
            f"storage: {{filesystem: {{rootdirectory: {work / 'storage'}}}}}\n"
            f"http: {{{http}}}\n{auth}"
        )
        self.log = open(work / "registry.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.time() + 20
        scheme = "https" if credentials else "http"
        while True:
            try:
                urllib.request.urlopen(
                    f"{scheme}://{self.address}/v2/",
                    timeout=1,
                    context=ssl._create_unverified_context(),
                ).read()
                return
            except urllib.error.HTTPError:
                return  # 401: up, and asking for credentials
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("docker-registry did not start") from None
                time.sleep(0.1)

    def push(self, layout: Path, tag: str, name: str) -> str:
        ref = f"docker://{self.address}/{name}"
        cmd = ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{tag}", ref]
        if self.credentials:
            cmd[2:2] = ["--dest-creds", ":".join(self.credentials)]
        subprocess.run(cmd, check=True, capture_output=True)
        return ref

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


def _bcrypt(password: str) -> str:
    """A bcrypt hash (the registry's htpasswd backend accepts only bcrypt)."""
    import bcrypt

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
