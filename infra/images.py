"""Publishing a node image's disk as a machine image, one program per cloud, each exporting
`image`: what a cluster's node groups name as their image (`SQUALL_IMAGE_<CLOUD>`).

- AWS: the raw disk uploaded to a private bucket of the stack's, imported as an EBS snapshot
  (`ebs.SnapshotImport`, through a `vmimport`-style role of the stack's that may read that
  bucket alone), registered as a UEFI AMI with ENA and IMDSv2 only.
- GCP: the disk's tar.gz uploaded to a private bucket, made a Compute Engine image with the
  guest features a UEFI, gVNIC and multi-queue disk image declares.
- Azure: a generation 2 (UEFI) managed image from the fixed VHD, which the team uploads as
  a page blob first (`az storage blob upload --type page`): Azure makes images from page
  blobs only, and Pulumi's azure-native provider uploads block blobs only
  (pulumi-azure-native#2151).

Every resource carries the image's tags. The upload stays with the stack (the clouds read it
again to copy an image); destroying the stack deletes the machine image and the upload (on
Azure, the image; the page blob is the team's).
"""

from __future__ import annotations

import json
from typing import Any

import pulumi

from .image_spec import ImageSpec

__all__ = ["publish"]


def publish(spec: ImageSpec) -> Any:
    """Declare `spec`'s machine image in the current Pulumi stack; export and return its id."""
    if spec.cloud == "aws":
        image = _aws(spec)
    elif spec.cloud == "gcp":
        image = _gcp(spec)
    else:
        image = _azure(spec)
    pulumi.export("image", image)
    return image


def _aws(spec: ImageSpec) -> Any:
    import pulumi_aws as aws

    provider = aws.Provider(
        "aws", region=spec.region, default_tags=aws.ProviderDefaultTagsArgs(tags=spec.tags)
    )
    opts = pulumi.ResourceOptions(provider=provider)
    bucket = aws.s3.Bucket("upload", force_destroy=True, opts=opts)
    aws.s3.BucketPublicAccessBlock(
        "upload",
        bucket=bucket.id,
        block_public_acls=True,
        block_public_policy=True,
        ignore_public_acls=True,
        restrict_public_buckets=True,
        opts=opts,
    )
    disk = aws.s3.BucketObjectv2(
        "disk", bucket=bucket.id, key="disk.raw", source=pulumi.FileAsset(str(spec.disk)),
        opts=opts,
    )  # fmt: skip
    # the VM Import service reads the disk through a role it may assume (AWS names the
    # default one "vmimport"; this stack has its own, limited to its bucket)
    role = aws.iam.Role(
        "vmimport",
        assume_role_policy=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "vmie.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                        "Condition": {"StringEquals": {"sts:Externalid": "vmimport"}},
                    }
                ],
            }
        ),
        opts=opts,
    )
    policy = aws.iam.RolePolicy(
        "vmimport",
        role=role.id,
        policy=bucket.arn.apply(
            lambda arn: json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Action": ["s3:GetBucketLocation", "s3:GetObject", "s3:ListBucket"],
                            "Resource": [arn, f"{arn}/*"],
                        },
                        {
                            "Effect": "Allow",
                            "Action": [
                                "ec2:ModifySnapshotAttribute",
                                "ec2:CopySnapshot",
                                "ec2:RegisterImage",
                                "ec2:Describe*",
                            ],
                            "Resource": "*",
                        },
                    ],
                }
            )
        ),
        opts=opts,
    )
    snapshot = aws.ebs.SnapshotImport(
        "disk",
        disk_container=aws.ebs.SnapshotImportDiskContainerArgs(
            format="RAW",
            user_bucket=aws.ebs.SnapshotImportDiskContainerUserBucketArgs(
                s3_bucket=bucket.bucket, s3_key=disk.key
            ),
        ),
        role_name=role.name,
        description=f"{spec.image_name} ({spec.digest})",
        opts=pulumi.ResourceOptions(provider=provider, depends_on=[policy]),
    )
    ami = aws.ec2.Ami(
        "image",
        name=spec.image_name,
        description=f"Squall node image {spec.digest}",
        architecture="x86_64",
        boot_mode="uefi",  # the disk boots systemd-boot from its EFI partition
        ena_support=True,
        imds_support="v2.0",
        virtualization_type="hvm",
        root_device_name="/dev/xvda",
        ebs_block_devices=[
            aws.ec2.AmiEbsBlockDeviceArgs(
                device_name="/dev/xvda",
                snapshot_id=snapshot.id,
                volume_type="gp3",
                delete_on_termination=True,
            )
        ],
        opts=opts,
    )
    return ami.id


def _gcp(spec: ImageSpec) -> Any:
    import pulumi_gcp as gcp

    from .gcp import labels as gcp_labels

    labels = gcp_labels(spec.tags)
    provider = gcp.Provider("gcp", region=spec.region, default_labels=labels)
    opts = pulumi.ResourceOptions(provider=provider)
    bucket = gcp.storage.Bucket(
        "upload",
        location=spec.region.upper(),
        uniform_bucket_level_access=True,
        public_access_prevention="enforced",
        force_destroy=True,
        opts=opts,
    )
    disk = gcp.storage.BucketObject(
        "disk", bucket=bucket.name, name="disk.tar.gz", source=pulumi.FileAsset(str(spec.disk)),
        opts=opts,
    )  # fmt: skip
    image = gcp.compute.Image(
        "image",
        name=spec.image_name,
        family=spec.name,
        description=f"Squall node image {spec.digest}",
        raw_disk=gcp.compute.ImageRawDiskArgs(
            source=pulumi.Output.concat(
                "https://storage.googleapis.com/", bucket.name, "/", disk.name
            )
        ),
        guest_os_features=[
            gcp.compute.ImageGuestOsFeatureArgs(type=feature)
            for feature in ("UEFI_COMPATIBLE", "GVNIC", "VIRTIO_SCSI_MULTIQUEUE")
        ],
        storage_locations=[spec.region],
        labels=labels,
        opts=opts,
    )
    return image.self_link


def _azure(spec: ImageSpec) -> Any:
    from pulumi_azure_native import compute, resources

    tags = spec.tags
    where = spec.region
    rg = resources.ResourceGroup("images", location=where, tags=tags).name
    image = compute.Image(
        "image",
        image_name=spec.image_name,
        resource_group_name=rg,
        location=where,
        hyper_v_generation=compute.HyperVGenerationTypes.V2,  # UEFI
        storage_profile=compute.ImageStorageProfileArgs(
            os_disk=compute.ImageOSDiskArgs(
                os_type=compute.OperatingSystemTypes.LINUX,
                os_state=compute.OperatingSystemStateTypes.GENERALIZED,
                blob_uri=spec.blob_url,
                storage_account_type=compute.StorageAccountTypes.STANDARD_LRS,
            )
        ),
        tags=tags,
    )
    return image.id
