"""What a cloud run's nodes printed on their consoles: shown when they do not join in time.

A node that fails before its agent can say anything (no network, a mount that never comes,
an image without `squall`) leaves the reason only on its serial console, where the boot
script and the agent write (infra/bootstrap.py). AWS's console is read with the credentials
the run was made with (boto3, already a dependency); the other clouds' SDKs are not
dependencies, so for them the error says where to read it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

__all__ = ["CONSOLE_HINTS", "consoles_of"]

# how to read a node's console by hand where Squall cannot
CONSOLE_HINTS = {
    "gcp": "its serial console: gcloud compute instances get-serial-port-output NAME",
    "azure": "its boot diagnostics: az vm boot-diagnostics get-boot-log (scale set: "
    "az vmss get-instance-view)",
}


def _aws(run_id: str, region: str) -> dict[str, str]:
    """Hostname (the first label of the private DNS name, what a node joins as) -> console
    text, of every instance of the run still there."""
    import boto3

    ec2 = boto3.Session().client("ec2", region_name=region)
    found = ec2.describe_instances(
        Filters=[
            {"Name": "tag:squall-run", "Values": [run_id]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping"]},
        ]
    )
    out = {}
    for reservation in found.get("Reservations", []):
        for instance in reservation.get("Instances", []):
            name = (instance.get("PrivateDnsName") or instance["InstanceId"]).split(".")[0]
            try:  # botocore decodes the console's base64
                text = ec2.get_console_output(InstanceId=instance["InstanceId"], Latest=True)
                out[name] = str(text.get("Output") or "(nothing on the console yet)")
            except Exception as exc:  # one console that cannot be read hides no other
                out[name] = f"(could not be read: {type(exc).__name__}: {exc})"
    return out


def consoles_of(cloud: str, run_id: str, region: str) -> Callable[[], Mapping[str, str]] | None:
    """A reader of the run's node consoles on `cloud` (errors become its one entry); None
    where Squall cannot read them."""
    if cloud != "aws":
        return None

    def read() -> Mapping[str, str]:
        try:
            return _aws(run_id, region)
        except Exception as exc:  # a failed read must not hide the join error
            return {"consoles": f"could not be read: {type(exc).__name__}: {exc}"}

    return read
