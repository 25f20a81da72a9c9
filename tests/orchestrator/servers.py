"""Servers the data tests talk to, on 127.0.0.1 or at an address of a network namespace of
their own (a machine elsewhere, `netns`): an HTTPS file server with Range and ETag support
that can be told to misbehave, and moto's S3 server; each keeps who called it."""

from __future__ import annotations

import ctypes
import hashlib
import http.server
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.substrate.registry import free_port, self_signed_certificate

_ACCESS = re.compile(r"^(\d+\.\d+\.\d+\.\d+) - - \[")  # werkzeug's access log
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def in_netns(netns: Path | None, make: Callable[[], T]) -> T:
    """`make()` called in a thread that joined the network namespace `netns`: the sockets it
    opens stay there, wherever they are used from (None: here)."""
    if netns is None:
        return make()
    done: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        fd = os.open(netns, os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {netns}")
            done.append(make())
        except BaseException as exc:
            failed.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return done[0]


class FileServer:
    """Serves `files` (name -> bytes). `fail_next` requests get a 500; `cut_next` responses
    stop half-way (the connection drops), to exercise retries and resumed downloads."""

    def __init__(
        self,
        work: Path,
        files: dict[str, bytes],
        host: str = "127.0.0.1",
        netns: Path | None = None,
    ) -> None:
        self.files = files
        self.fail_next = 0
        self.cut_next = 0
        self.gets: list[tuple[str, str]] = []  # (path, Range header)
        self.clients: list[str] = []  # the address of every request's peer
        cert, key = self_signed_certificate(work, "https", host)
        self.ca_file = str(cert)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _lookup(self) -> bytes | None:
                body = server.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                return body

            def _headers(self, body: bytes, status: int = 200, start: int = 0) -> None:
                self.send_response(status)
                self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()

            def do_HEAD(self) -> None:
                server.clients.append(self.client_address[0])
                body = self._lookup()
                if body is not None:
                    self._headers(body)

            def do_GET(self) -> None:
                server.clients.append(self.client_address[0])
                server.gets.append((self.path, self.headers.get("Range", "")))
                if server.fail_next:
                    server.fail_next -= 1
                    self.send_error(500, "try again")
                    return
                body = self._lookup()
                if body is None:
                    return
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes="):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                self._headers(body, 206 if start else 200, start)
                payload = body[start:]
                if server.cut_next:
                    server.cut_next -= 1
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(payload)

        self.httpd = in_netns(netns, lambda: http.server.ThreadingHTTPServer((host, 0), Handler))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class S3Server:
    """moto's S3 server, as a process on a free port."""

    def __init__(self, work: Path, host: str = "127.0.0.1", netns: Path | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.log_file = work / "moto.log"
        self.log = open(self.log_file, "wb")  # noqa: SIM115
        moto = str(Path(sys.executable).parent / "moto_server")  # this environment's own
        enter = ["ip", "netns", "exec", netns.name] if netns is not None else []
        self.proc = subprocess.Popen(
            [*enter, moto, "-H", host, "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        self.credentials = {
            "endpoint": self.endpoint,
            "region": "us-east-1",
            "accessKeyId": "testing",
            "secretAccessKey": "testing",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def clients(self, since: int = 0) -> list[str]:
        """The peer address of each request in the access log, from byte `since` of it."""
        self.log.flush()
        lines = self.log_file.read_bytes()[since:].decode(errors="replace").splitlines()
        return [m.group(1) for line in lines if (m := _ACCESS.match(line))]

    def log_size(self) -> int:
        return self.log_file.stat().st_size

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()
