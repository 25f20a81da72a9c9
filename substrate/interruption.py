"""The cloud's notice that it is about to take this node back (spot or preemptible capacity),
read from the instance metadata service every few seconds; the agent's Health reply carries
it, so that the orchestrator puts the node's work back in line before the node is gone.

- AWS: `GET /latest/meta-data/spot/instance-action` (with an IMDSv2 token): 404 until the
  two-minute warning, then `{"action": "terminate", "time": "..."}`.
- GCP: `GET /computeMetadata/v1/instance/preempted` (`Metadata-Flavor: Google`): `TRUE` once
  the instance is being preempted (about 30 s before it stops).
- Azure: `GET /metadata/scheduledevents?api-version=2020-07-01` (`Metadata: true`): an event
  of type `Preempt` (about 30 s ahead) whose `Resources` name this VM (every VM of a scale
  set sees its neighbours' events; the VM's name is `/metadata/instance/compute/name`).

Requests go straight to the metadata address (no proxy from the environment), with a short
timeout, and read at most 64 KiB.

Standard library only: this runs inside node images.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

__all__ = ["CLOUDS", "InterruptionWatch", "read_notice"]

DEFAULT_BASE = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}
CLOUDS = tuple(DEFAULT_BASE)
TIMEOUT = 2.0  # seconds for one metadata request


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, headers: dict[str, str], method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with _OPENER.open(request, timeout=TIMEOUT) as reply:
            return reply.status, reply.read(65536).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def read_notice(cloud: str, base: str) -> str:
    """The cloud's notice for this node now ("": none). Raises OSError when the metadata
    service cannot be reached."""
    base = base.rstrip("/")
    if cloud == "aws":
        status, token = _get(
            f"{base}/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": "60"},
            method="PUT",
        )
        headers = {"X-aws-ec2-metadata-token": token} if status == 200 else {}
        status, body = _get(f"{base}/latest/meta-data/spot/instance-action", headers)
        if status != 200:
            return ""
        try:
            action = json.loads(body)
        except ValueError:
            action = None
        if not isinstance(action, dict):
            return f"aws: spot instance-action {body[:100]}"
        return f"aws: spot instance-action {action.get('action')} at {action.get('time')}"
    if cloud == "gcp":
        status, body = _get(
            f"{base}/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"}
        )
        return "gcp: the instance is being preempted" if body.strip() == "TRUE" else ""
    if cloud == "azure":
        status, body = _get(
            f"{base}/metadata/scheduledevents?api-version=2020-07-01", {"Metadata": "true"}
        )
        try:
            document = json.loads(body) if status == 200 else {}
        except ValueError:
            return ""
        events = document.get("Events", []) if isinstance(document, dict) else []
        preempts = [e for e in events if isinstance(e, dict) and e.get("EventType") == "Preempt"]
        if not preempts:
            return ""
        status, name = _get(
            f"{base}/metadata/instance/compute/name?api-version=2021-02-01&format=text",
            {"Metadata": "true"},
        )
        for event in preempts:
            resources = event.get("Resources") or []
            if status == 200 and isinstance(resources, list) and name.strip() in resources:
                return f"azure: Preempt scheduled for {event.get('NotBefore') or 'now'}"
        return ""
    raise ValueError(f"no interruption notices for cloud {cloud!r}; one of {', '.join(CLOUDS)}")


class InterruptionWatch:
    """Reads the notice every `every` seconds on a thread of its own; `notice` is the latest
    ("": none, or the service could not be read)."""

    def __init__(
        self,
        cloud: str,
        base: str = "",
        every: float = 5.0,
        read: Callable[[str, str], str] = read_notice,
    ) -> None:
        if cloud not in CLOUDS:
            raise ValueError(f"no interruption notices for {cloud!r}; one of {', '.join(CLOUDS)}")
        self.cloud, self.base, self.every, self.read = (
            cloud,
            base or DEFAULT_BASE[cloud],
            every,
            read,
        )
        self.notice = ""
        self.stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="interruption", daemon=True).start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                notice = self.read(self.cloud, self.base)
            except Exception:  # a bad answer, a broken service: look again next time
                notice = ""
            if notice:
                self.notice = notice  # a notice stays: the node is going
            self.stop.wait(self.every)
