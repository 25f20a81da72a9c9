"""A stand-in for the `pulumi` CLI, for the provisioner's tests.

There is no Pulumi CLI on this machine (it is not on PyPI, Debian or npm, and no cloud could be
reached anyway), so the Automation API is pointed at this script through its own seam,
`PulumiCommand(root=...)`, which runs `<root>/bin/pulumi`. It keeps each stack as a JSON file in
the file backend's folder and answers the commands the SDK sends, in the shapes the SDK parses.
`up` does not run the program (the programs are tested under mocks in tests/infra): it "creates"
one instance per node of the spec in the stack's config, and for each real agent listed in
$FAKE_PULUMI_AGENTS (a JSON list of HOST:PORT; local agents standing in for the nodes in the engine
tests) it does what that node's boot would: it joins the run at the orchestrator's join service
its boot data names, with the run's token, as that agent (its address and port; the agents were
started with the run's CA, so the certificate the join returns is thrown away). The token reaches
a node only inside its secret boot script, which the fake does not make: the test fixed it and
says it in $FAKE_PULUMI_TOKEN.

Knobs: $FAKE_PULUMI_LOG (append each argv as a JSON line), $FAKE_PULUMI_FAIL=up|destroy (fail
that command after doing half of it), $FAKE_PULUMI_SLOW_UP=SECONDS (sleep inside `up`).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--non-interactive"]
    if os.environ.get("FAKE_PULUMI_LOG"):
        with open(os.environ["FAKE_PULUMI_LOG"], "a") as f:
            f.write(json.dumps(args) + "\n")
    if args == ["version"]:
        print("v3.272.0")
        return 0
    backend = os.environ.get("PULUMI_BACKEND_URL", "")
    if not backend.startswith("file://"):
        return fail(f"error: the fake handles file:// backends only, not {backend!r}")
    if not os.environ.get("PULUMI_CONFIG_PASSPHRASE"):
        return fail("error: passphrase must be set with PULUMI_CONFIG_PASSPHRASE")
    root = Path(backend.removeprefix("file://")) / ".fake"
    root.mkdir(parents=True, exist_ok=True)
    name = value_of(args, "--stack")
    if args[:2] == ["stack", "init"]:
        name = args[2]
        if (root / f"{name}.json").exists():
            return fail(f"error: stack '{name}' already exists")
        save(root, name, {"config": {}, "resources": [], "outputs": {}, "history": []})
        return 0
    if args[:2] == ["stack", "rm"]:
        name = args[-1]
        state = load(root, name)
        if state is None:
            return fail(f"error: no stack named '{name}' found")
        if state["resources"]:
            return fail(f"error: '{name}' still has resources; removal rejected")
        (root / f"{name}.json").unlink()
        return 0
    state = load(root, name) if name else None
    if state is None:
        return fail(f"error: no stack named '{name}' found")
    if args[:2] == ["stack", "select"]:
        return 0
    if args[:2] == ["config", "set-all"]:
        for flag, pair in itertools.pairwise(args):
            if flag in ("--plaintext", "--secret"):
                key, _, value = pair.partition("=")
                state["config"][key] = {"value": value, "secret": flag == "--secret"}
        save(root, name, state)
        return 0
    if args[:2] == ["stack", "output"]:
        print(json.dumps(state["outputs"]))
        return 0
    if args[:2] == ["stack", "history"]:
        print(json.dumps(state["history"][-1:]))
        return 0
    if args[0] == "up":
        return up(root, name, state)
    if args[0] == "destroy":
        return destroy(root, name, state)
    return fail(f"error: the fake does not know {' '.join(args)!r}")


def up(root: Path, name: str, state: dict) -> int:
    if "squall:spec" not in state["config"]:  # a node image's stack (no config: no secrets)
        print(f"Updating ({name}):")
        state["resources"].append({"name": "image", "tags": {}})
        state["outputs"] = {"image": f"ami-{abs(hash(name)) % 16**8:08x}"}
        state["history"].append(entry("update", 1))
        save(root, name, state)
        return 0
    spec = json.loads(state["config"]["squall:spec"]["value"])
    given = (
        json.loads(Path(os.environ["FAKE_PULUMI_AGENTS"]).read_text())
        if os.environ.get("FAKE_PULUMI_AGENTS")
        else []
    )
    nodes = [(g["name"], i) for g in spec["node_groups"] for i in range(g["count"])]
    failing = os.environ.get("FAKE_PULUMI_FAIL") == "up"
    print(f"Updating ({name}):")
    for n, (group, i) in enumerate(nodes):
        if failing and n == len(nodes) // 2:
            save(root, name, state)
            print(f"    {group}-{i}  creating failed", flush=True)
            return fail(f"error: creating instance ({group}-{i}): InsufficientInstanceCapacity")
        state["resources"].append({"name": f"{group}-{i}", "tags": spec_tags(spec)})
        save(root, name, state)
        print(f" +  {group}-{i}  created", flush=True)
        time.sleep(float(os.environ.get("FAKE_PULUMI_SLOW_UP", "0")) / len(nodes))
        if n < len(given):
            join_as(given[n], spec, os.environ["FAKE_PULUMI_TOKEN"], group, i)
    state["history"].append(entry("update", len(nodes)))
    save(root, name, state)
    print(f"Resources:\n    + {len(nodes)} created")
    return 0


def join_as(agent: str, spec: dict, token: str, group: str, index: int) -> None:
    """Join the run as the node of `group` at `agent` (HOST:PORT) would at its boot."""
    sys.path.insert(0, str(ROOT))
    from substrate.join import JoinRequest, join

    boot = spec["bootstrap"]
    storage = spec.get("storage") or {}
    keeps = (  # the node that keeps the volumes names its place, as its boot script does
        storage.get("storage_class") in ("node-local", "nfs-first-node")
        and group == spec["node_groups"][0]["name"]
        and index == 0
    )
    host, _, port = agent.rpartition(":")
    request = JoinRequest(
        orchestrator=boot["orchestrator"],
        join_ca=boot["ca_certificate"].encode(),
        run_id=spec["run_id"],
        token=token,
        group=group,
        agent_port=int(port),
        address=host,
        hostname=f"{group}-{index}-standin",
        index=0 if keeps else None,
    )
    with tempfile.TemporaryDirectory() as tls:
        join(request, Path(tls), deadline_s=30)
    print(f"    {group}-{index}  joined", flush=True)


def destroy(root: Path, name: str, state: dict) -> int:
    print(f"Destroying ({name}):")
    if os.environ.get("FAKE_PULUMI_FAIL") == "destroy" and state["resources"]:
        gone = state["resources"].pop()
        save(root, name, state)
        print(f" -  {gone['name']}  deleted")
        return fail("error: deleting security group: DependencyViolation")
    while state["resources"]:
        gone = state["resources"].pop()
        print(f" -  {gone['name']}  deleted", flush=True)
    state["outputs"] = {}
    state["history"].append(entry("destroy", 0))
    save(root, name, state)
    return 0


def spec_tags(spec: dict) -> dict:
    return {"squall-run": spec["run_id"], "squall-expires-at": spec["expires_at"]}


def entry(kind: str, count: int) -> dict:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "version": 1,
        "kind": kind,
        "startTime": now,
        "endTime": now,
        "message": "",
        "environment": {},
        "config": {},
        "result": "succeeded",
        "resourceChanges": {"create" if kind == "update" else "delete": count},
    }


def value_of(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def load(root: Path, name: str | None) -> dict | None:
    path = root / f"{name}.json"
    return json.loads(path.read_text()) if name and path.exists() else None


def save(root: Path, name: str, state: dict) -> None:
    tmp = root / f"{name}.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(root / f"{name}.json")


def fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 255


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
