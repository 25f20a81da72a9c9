"""Publishing the node image's disk to each cloud, under Pulumi's mocks (no cloud account and
no `pulumi` CLI here): the upload goes to a private bucket or storage account of the stack's,
the machine image boots UEFI from it, and every resource carries the image's tags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pulumi
import pytest
from pydantic import ValidationError

from infra.image_spec import DISK_FORMAT, ImageSpec
from infra.images import publish

from .mocks import RecordingMocks, install

DIGEST = "sha256:" + "ab12" * 16


def spec(cloud: str, tmp_path: Path, **change: Any) -> ImageSpec:
    disk = tmp_path / f"disk.{DISK_FORMAT[cloud]}"
    disk.write_bytes(b"\0" * 4096)
    fields: dict[str, Any] = {
        "name": "squall-node",
        "digest": DIGEST,
        "cloud": cloud,
        "region": {"aws": "us-east-2", "gcp": "us-central1", "azure": "eastus"}[cloud],
        "disk": disk,
        "disk_format": DISK_FORMAT[cloud],
        "owner": "platform",
    }
    return ImageSpec(**(fields | change))


def published(image: ImageSpec) -> tuple[RecordingMocks, str]:
    mocks = install(image.stack_name)
    seen: list[str] = []

    @pulumi.runtime.test
    def build() -> Any:
        return publish(image).apply(seen.append)

    build()
    return mocks, seen[0]


def test_aws_imports_the_raw_disk_as_a_uefi_ami_from_a_private_bucket(tmp_path: Path) -> None:
    image = spec("aws", tmp_path)
    mocks, ami = published(image)
    assert ami == "image-id"
    (block,) = mocks.of("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
    assert all(
        block.inputs[k]
        for k in (
            "blockPublicAcls",
            "blockPublicPolicy",
            "ignorePublicAcls",
            "restrictPublicBuckets",
        )
    )
    (obj,) = mocks.of("aws:s3/bucketObjectv2:BucketObjectv2")
    assert obj.inputs["key"] == "disk.raw"
    (snapshot,) = mocks.of("aws:ebs/snapshotImport:SnapshotImport")
    container = snapshot.inputs["diskContainer"]
    assert container["format"] == "RAW"
    assert container["userBucket"]["s3Key"] == "disk.raw"
    # the import role trusts the VM Import service and reads this stack's bucket alone
    (role,) = mocks.of("aws:iam/role:Role")
    assert snapshot.inputs["roleName"] == mocks.state(role.typ, role.name)["name"]
    assert "vmie.amazonaws.com" in role.inputs["assumeRolePolicy"]
    (policy,) = mocks.of("aws:iam/rolePolicy:RolePolicy")
    assert "arn:aws:mock:::upload" in policy.inputs["policy"]
    assert '"s3:PutObject"' not in policy.inputs["policy"]
    (registered,) = mocks.of("aws:ec2/ami:Ami")
    assert registered.inputs["name"] == f"squall-node-{'ab12' * 3}"
    assert registered.inputs["bootMode"] == "uefi"
    assert registered.inputs["enaSupport"] is True
    assert registered.inputs["imdsSupport"] == "v2.0"
    (device,) = registered.inputs["ebsBlockDevices"]
    assert device["snapshotId"] == "disk-id"
    assert device["deviceName"] == registered.inputs["rootDeviceName"]
    (provider,) = mocks.of("pulumi:providers:aws")
    assert provider.inputs["region"] == "us-east-2"
    tags = json.loads(provider.inputs["defaultTags"])["tags"]
    assert tags == {
        "squall-image": "squall-node",
        "squall-image-digest": "ab12ab12ab12",
        "squall-owner": "platform",
    }


def test_gcp_makes_a_uefi_gvnic_image_from_the_uploaded_tarball(tmp_path: Path) -> None:
    image = spec("gcp", tmp_path)
    mocks, link = published(image)
    assert link.endswith("/image")
    (bucket,) = mocks.of("gcp:storage/bucket:Bucket")
    assert bucket.inputs["publicAccessPrevention"] == "enforced"
    assert bucket.inputs["uniformBucketLevelAccess"] is True
    (obj,) = mocks.of("gcp:storage/bucketObject:BucketObject")
    assert obj.inputs["name"] == "disk.tar.gz"
    (made,) = mocks.of("gcp:compute/image:Image")
    assert made.inputs["rawDisk"]["source"].endswith("/disk.tar.gz")
    assert {f["type"] for f in made.inputs["guestOsFeatures"]} == {
        "UEFI_COMPATIBLE",
        "GVNIC",
        "VIRTIO_SCSI_MULTIQUEUE",
    }
    assert made.inputs["family"] == "squall-node"
    assert made.inputs["labels"]["squall-image-digest"] == "ab12ab12ab12"


def test_azure_makes_a_generation_2_image_from_the_teams_page_blob(tmp_path: Path) -> None:
    url = "https://teamimages.blob.core.windows.net/vhds/squall-node.vhd"
    image = spec("azure", tmp_path, blob_url=url)
    mocks, image_id = published(image)
    assert image_id.endswith("azure-native:compute:Image/image")
    (made,) = mocks.of("azure-native:compute:Image")
    assert made.inputs["hyperVGeneration"] == "V2"
    os_disk = made.inputs["storageProfile"]["osDisk"]
    assert (os_disk["osType"], os_disk["osState"]) == ("Linux", "Generalized")
    assert os_disk["blobUri"] == url
    assert made.inputs["tags"]["squall-image"] == "squall-node"
    # nothing of the team's upload is the stack's: destroying it leaves the blob
    assert not [t for t in mocks.types() if t.startswith("azure-native:storage")]


def test_azure_needs_the_page_blob_and_the_others_upload_themselves(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="pulumi-azure-native#2151"):
        spec("azure", tmp_path)
    with pytest.raises(ValidationError, match="a blob URL is for Azure"):
        spec("aws", tmp_path, blob_url="https://x.blob.core.windows.net/v/d.vhd")
    sas = "https://x.blob.core.windows.net/v/d.vhd?sv=2024&sig=s3cr3t"
    with pytest.raises(ValidationError, match="without its SAS token") as refused:
        spec("azure", tmp_path, blob_url=sas)
    assert "s3cr3t" not in str(refused.value).split("input_value")[0]


@pytest.mark.parametrize(("cloud", "wrong"), [("aws", "qcow2"), ("gcp", "raw"), ("azure", "raw")])
def test_each_cloud_takes_only_the_disk_format_its_import_reads(
    tmp_path: Path, cloud: str, wrong: str
) -> None:
    with pytest.raises(ValidationError, match=f"imports a {DISK_FORMAT[cloud]} disk"):
        spec(cloud, tmp_path, disk_format=wrong, blob_url=None)


def test_a_stack_is_named_by_image_digest_cloud_and_region(tmp_path: Path) -> None:
    image = spec("gcp", tmp_path)
    assert image.stack_name == "squall-image-squall-node-ab12ab12ab12-gcp-us-central1"
