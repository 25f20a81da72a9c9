"""`squall image publish`: a built node image as one cloud region's machine image, through a
Pulumi stack of its own (infra/images.py), recorded in the stack ledger."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError

from infra.image_spec import DISK_FORMAT, ImageSpec

from ..provision.stacks import StackDriver
from .build import BuiltImage
from .disk import export_disk
from .recipe import RecipeError

__all__ = ["CLOUDS", "Published", "check_request", "publish_image"]

CLOUDS = tuple(DISK_FORMAT)


@dataclass(frozen=True, slots=True)
class Published:
    image: str  # the machine image's id: an AMI id, a GCE image link, an Azure image id
    stack: str  # the stack that holds it (`squall stack destroy` takes it down)
    digest: str  # the OCI image's digest it was made from


def check_request(cloud: str, blob_url: str | None) -> None:
    """Refuse, before anything is built, a cloud Squall does not publish to, and an Azure
    image without its page blob."""
    if cloud not in DISK_FORMAT:
        raise RecipeError(f"cloud {cloud!r} is not one of {', '.join(CLOUDS)}")
    if cloud == "azure" and not blob_url:
        raise RecipeError(
            "Azure makes an image from a page blob, which Pulumi's azure-native provider "
            "cannot upload (pulumi-azure-native#2151): export the disk (--format vhd), upload "
            "it with `az storage blob upload --type page` and give --blob-url"
        )


def publish_image(
    image: BuiltImage,
    cloud: str,
    region: str,
    driver: StackDriver,
    say: Callable[[str], None],
    blob_url: str | None = None,
) -> Published:
    """Export `image`'s disk in the format `cloud` imports (kept beside the build) and
    publish it in `region`. RecipeError for what cannot be exported or published as asked;
    ProvisionError from the stack."""
    check_request(cloud, blob_url)
    fmt = DISK_FORMAT[cloud]
    disk = image.layout.parent / f"disk.{fmt}"
    try:
        spec = ImageSpec(
            name=image.tag,
            digest=image.digest,
            cloud=cloud,  # type: ignore[arg-type]
            region=region,
            disk=disk,
            disk_format=fmt,
            owner=os.environ.get("USER", "squall"),
            blob_url=blob_url or None,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RecipeError(f"cannot publish: {first['msg'].removeprefix('Value error, ')}") from None
    if not disk.exists() and spec.blob_url is None:
        say(f"exporting the disk ({fmt})")
        export_disk(image, disk, fmt)
    made = driver.publish(spec, say)
    return Published(image=made, stack=spec.stack_name, digest=image.digest)
