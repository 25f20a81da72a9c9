"""Service endpoints as the containers of a run see them: `FB_ENDPOINT_URL_<NAME>` and
`FB_ENDPOINT_PATH_<NAME>` (spec §4.7, §5).

Fuzzball publishes an endpoint through its proxy, at a URL of the proxy. Squall has no proxy:
an endpoint is reached where its service listens, at `SERVICE.svc:PORT` on the run's pod
network (every container of a run has `SERVICE.svc` in its /etc/hosts), and from outside the
run with `squall workflow port-forward RUN SERVICE LOCAL:PORT`. So the URL is direct
(`http://SERVICE.svc:PORT/`, its scheme the endpoint's protocol) and the path is `/` whatever
the endpoint's `type`. The variables go to the service itself and to every job or service
that depends on it. `FB_ENDPOINT_ID_<NAME>` is not set: it names an endpoint to Fuzzball's
token API, which Squall does not have.
"""

from __future__ import annotations

import re

from .model import Container, Endpoint, Service, Workflow

__all__ = ["endpoint_env", "endpoint_url", "env_suffix"]

_NOT_IN_A_NAME = re.compile(r"[^A-Z0-9_]")


def env_suffix(endpoint: str) -> str:
    """`<NAME>` of the variables of endpoint `endpoint`: upper-cased, `-` and `.` as `_`."""
    return _NOT_IN_A_NAME.sub("_", endpoint.upper())


def endpoint_url(service: Service, endpoint: Endpoint) -> str:
    """Where `endpoint` of `service` is reached from the run's containers."""
    port = next(p.port for p in service.ports if p.name == endpoint.port_name)
    url = f"{endpoint.protocol}://{service.name}.svc:{port}"
    return url + "/" if endpoint.protocol in ("http", "https") else url


def endpoint_env(wf: Workflow, container: Container) -> dict[str, str]:
    """The FB_ENDPOINT_* variables of `container`: its own endpoints if it is a service, and
    those of the services it depends on."""
    names = [container.name, *(d.name for d in container.depends_on)]
    env: dict[str, str] = {}
    for name in dict.fromkeys(names):
        service = wf.services.get(name)
        if service is None:
            continue
        for endpoint in service.endpoints:
            suffix = env_suffix(endpoint.name)
            env[f"FB_ENDPOINT_URL_{suffix}"] = endpoint_url(service, endpoint)
            env[f"FB_ENDPOINT_PATH_{suffix}"] = "/"
    return env
