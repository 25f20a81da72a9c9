"""Cloud resources that carry a Squall run tag but that no open ledger entry explains: what
`squall stack gc` reports (and never deletes: a person decides, since the ledger cannot say
what they are).

AWS is asked through the Resource Groups Tagging API, per region. GCP and Azure need their
inventory clients (Cloud Asset, Resource Graph), which Squall does not ship yet; the report
says so instead of claiming they are clean.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Orphan", "aws_orphans"]

RUN_TAG = "squall-run"


@dataclass(frozen=True, slots=True)
class Orphan:
    cloud: str
    region: str
    resource: str  # ARN or resource id
    run_id: str


def aws_orphans(
    regions: Iterable[str], explained: set[str], *, endpoint_url: str | None = None
) -> list[Orphan]:
    """Resources tagged squall-run=<id> whose id is not in `explained` (the run ids of open
    ledger entries). Raises botocore's errors (no credentials, access denied) to the caller."""
    import boto3

    found = []
    for region in sorted(set(regions)):
        client = boto3.client(
            "resourcegroupstaggingapi", region_name=region, endpoint_url=endpoint_url
        )
        for page in client.get_paginator("get_resources").paginate(TagFilters=[{"Key": RUN_TAG}]):
            for item in page["ResourceTagMappingList"]:
                tags = {t["Key"]: t["Value"] for t in item.get("Tags", [])}
                if tags.get(RUN_TAG) not in explained:
                    found.append(Orphan("aws", region, item["ResourceARN"], tags[RUN_TAG]))
    return found
