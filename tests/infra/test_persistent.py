"""Persistent volumes on every cloud, under Pulumi's mocks (no cloud account, no `pulumi` CLI
here): the team's NFS share named for the region reaches every node's boot script, which
mounts it (retrying, before the agent starts, and after every reboot) and gives the agent a
volume root on it; the stack makes nothing for it, since the share outlives the stack."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.bootstrap import AGENT_DIR, PERSISTENT_OPTIONS, startup_script
from infra.spec import PERSISTENT_ROOT, ClusterSpec, StorageClass

from .mocks import run
from .scripts import boot_scripts, groups_of, mounted_source
from .specs import with_volumes

CLOUDS = ("aws", "gcp", "azure")
INVOKES = {"gcp:compute/getZones:getZones": {"names": ["us-central1-a"]}}
SHARE = "10.0.0.9:/team-volumes"


@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_node_mounts_the_regions_share_of_persistent_volumes(cloud: str) -> None:
    spec = with_volumes(cloud, StorageClass.MANAGED, 2, 1).model_copy(
        update={"persistent_share": SHARE}
    )
    with_share = run(spec, INVOKES)
    without = run(with_volumes(cloud, StorageClass.MANAGED, 2, 1), INVOKES)
    scripts = boot_scripts(with_share, cloud)
    assert set(groups_of(scripts)) == {"g0", "g1"}
    for script in scripts.values():
        assert mounted_source(script, PERSISTENT_ROOT, "the persistent volumes") == (
            SHARE,
            PERSISTENT_OPTIONS,
        )
        mounted_source(script)  # the run's own volumes, as before
    for script in boot_scripts(without, cloud).values():
        assert PERSISTENT_ROOT not in script
        assert "SQUALL_SHARE_DENY" not in script
    # nothing of the stack is made for it: the share is the team's, and outlives runs
    assert sorted(r.typ for r in with_share.created) == sorted(r.typ for r in without.created)


@pytest.mark.parametrize("share", ["no-path", "host:relative", "host:/a b", ":/x"])
def test_a_share_is_host_colon_absolute_path(share: str) -> None:
    fields = with_volumes("aws", StorageClass.MANAGED).model_dump()
    with pytest.raises(ValidationError, match="persistent_share"):
        ClusterSpec.model_validate({**fields, "persistent_share": share})


def test_jobs_are_denied_the_shares_addresses_found_at_boot(tmp_path: Path) -> None:
    """The boot script resolves the share's host and hands its addresses to the agent as
    networks its containers never reach; run here, as sh, on the script's own lines."""
    spec = with_volumes("aws", StorageClass.MANAGED, 1).model_copy(
        update={"persistent_share": "localhost:/team-volumes"}
    )
    script = startup_script(spec, spec.node_groups[0])
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("deny=''"))
    snippet = "\n".join(lines[start : start + 3]).replace(AGENT_DIR, str(tmp_path))
    subprocess.run(["sh", "-eu", "-c", snippet], check=True)
    assert (tmp_path / "share.env").read_text().split() == [
        "SQUALL_SHARE_DENY=",
        "--deny-network",
        "127.0.0.1/32",
    ]
    unit = script[script.index("[Service]") :]
    assert f"EnvironmentFile=-{AGENT_DIR}/share.env" in unit
    assert f"--volume-root {PERSISTENT_ROOT} $SQUALL_SHARE_DENY" in unit
