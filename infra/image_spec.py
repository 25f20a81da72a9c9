"""`ImageSpec`: a node image's disk to publish as one cloud region's machine image.

What a publishing stack needs and nothing about how the disk was made: the file, its format
(each cloud imports one: AWS a raw disk, GCE a tar.gz holding disk.raw, Azure a fixed VHD),
the image's name and digest, and the tags every resource carries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["DISK_FORMAT", "ImageSpec"]

# the disk format each cloud's import takes
DISK_FORMAT = {"aws": "raw", "gcp": "gce", "azure": "vhd"}


class ImageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,40}$")  # e.g. squall-node
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")  # the OCI image's
    cloud: Literal["aws", "gcp", "azure"]
    region: str = Field(min_length=1)
    disk: Path  # the exported disk, in DISK_FORMAT[cloud]
    disk_format: str
    owner: str = Field(min_length=1)
    # Azure: the disk already uploaded as a page blob (the azure-native provider uploads
    # block blobs only, pulumi-azure-native#2151, and Azure makes images from page blobs)
    blob_url: str | None = Field(default=None, pattern=r"^https://\S+\.vhd(\?\S*)?$")
    # (no SAS token: Azure reads the blob through the subscription, and a token in the URL
    # would sit in the stack's state in the clear)

    @model_validator(mode="after")
    def _format_fits(self) -> ImageSpec:
        want = DISK_FORMAT[self.cloud]
        if self.disk_format != want:
            raise ValueError(f"{self.cloud} imports a {want} disk, not {self.disk_format}")
        if self.cloud == "azure" and self.blob_url is None:
            raise ValueError(
                "Azure makes an image from a page blob, which Pulumi's azure-native provider "
                "cannot upload (pulumi-azure-native#2151): upload the VHD with `az storage "
                "blob upload --type page` and give its URL"
            )
        if self.blob_url is not None and "?" in self.blob_url:
            raise ValueError(
                "give the blob's URL without its SAS token (the part from '?'): Azure reads "
                "the blob through your subscription, and a token would be kept in the stack's "
                "state"
            )
        if self.cloud != "azure" and self.blob_url is not None:
            raise ValueError(f"a blob URL is for Azure; {self.cloud}'s stack uploads the disk")
        return self

    @property
    def short(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]

    @property
    def image_name(self) -> str:
        """The machine image's name: the recipe's, and the digest it was built as."""
        return f"{self.name}-{self.short}"

    @property
    def stack_name(self) -> str:
        return f"squall-image-{self.name}-{self.short}-{self.cloud}-{self.region}"

    @property
    def tags(self) -> dict[str, str]:
        return {
            "squall-image": self.name,
            "squall-image-digest": self.short,
            "squall-owner": self.owner,
        }
