"""A cloud's instance metadata service, served on loopback for the tests: what AWS, GCP and
Azure say about a spot or preemptible node being taken back (substrate/interruption.py),
with the headers each one requires checked as the real ones do."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

AWS_TOKEN = "imds-token-for-tests"


class Metadata:
    def __init__(self) -> None:
        self.aws_action: dict[str, str] | None = None  # the spot instance-action, once given
        self.gcp_preempted = False
        self.azure_events: list[dict[str, Any]] = []
        self.azure_name = "squall-node-3"  # this VM, as Azure names it
        self.url = ""


@contextmanager
def metadata_server() -> Iterator[Metadata]:
    state = Metadata()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: str = "") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            if self.path == "/latest/api/token" and self.headers.get(
                "X-aws-ec2-metadata-token-ttl-seconds"
            ):
                self._send(200, AWS_TOKEN)
            else:
                self._send(400)

        def do_GET(self) -> None:
            if self.path == "/latest/meta-data/spot/instance-action":
                if self.headers.get("X-aws-ec2-metadata-token") != AWS_TOKEN:
                    self._send(401)  # IMDSv2 only, as Squall's nodes are set up
                elif state.aws_action is None:
                    self._send(404)
                else:
                    self._send(200, json.dumps(state.aws_action))
            elif self.path == "/computeMetadata/v1/instance/preempted":
                if self.headers.get("Metadata-Flavor") != "Google":
                    self._send(403)
                else:
                    self._send(200, "TRUE" if state.gcp_preempted else "FALSE")
            elif self.path.startswith("/metadata/instance/compute/name"):
                if self.headers.get("Metadata") != "true":
                    self._send(400)
                else:
                    self._send(200, state.azure_name)
            elif self.path.startswith("/metadata/scheduledevents"):
                if self.headers.get("Metadata") != "true":
                    self._send(400)
                else:
                    self._send(
                        200, json.dumps({"DocumentIncarnation": 1, "Events": state.azure_events})
                    )
            else:
                self._send(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def noticing_agent(folder: Path, notices: str, token: str) -> Iterator[str]:
    """A real agent (plain processes, no pod network) that watches `notices`
    (`CLOUD=URL`, its --interruption-notices) for the cloud's notice; its address."""
    (folder / "token").write_text(token)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "substrate", "--data-dir", str(folder / "agent")),
            *("--token-file", str(folder / "token"), "--weak-runtimes", "--no-pod-network"),
            *("--interruption-notices", notices),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield line.split()[-1]
        assert proc.poll() is None, "the agent stopped"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
