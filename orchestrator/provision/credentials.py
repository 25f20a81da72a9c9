"""Whether this orchestrator has credentials for a cloud, found where that cloud's Pulumi
provider looks for them, without calling the cloud and without reading any secret value.
`squall doctor` reports them; a cloud run checks its cloud's before anything is created, so
that missing credentials are one line that says where to put them, not a failed `pulumi up`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["CREDENTIALS", "aws", "azure", "gcp"]

Found = tuple[bool, str]  # (found, where from, or where to put them)


def aws() -> Found:
    """boto3's chain, the one the AWS provider follows: the environment, ~/.aws (profiles,
    SSO), a container or instance role."""
    try:
        import boto3

        credentials = boto3.Session().get_credentials()
    except Exception as exc:  # a broken config file
        return False, f"{type(exc).__name__}: {exc}"
    if credentials is None:
        return False, "none found (AWS_ACCESS_KEY_ID..., aws configure or sso login, or a role)"
    return True, f"from {credentials.method}"


def _on(vendor_file: str, words: str) -> bool:
    try:
        return words in Path(vendor_file).read_text()
    except OSError:
        return False


def gcp() -> Found:
    """A key file or token in the environment, application default credentials (gcloud), or
    a Compute Engine VM's service account."""
    for name in (
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GOOGLE_CREDENTIALS",
        "GOOGLE_CLOUD_KEYFILE_JSON",
        "GOOGLE_OAUTH_ACCESS_TOKEN",
    ):
        if os.environ.get(name):
            return True, f"from the environment ({name})"
    config = os.environ.get("CLOUDSDK_CONFIG") or str(Path.home() / ".config" / "gcloud")
    if (Path(config) / "application_default_credentials.json").exists():
        return True, "application default credentials (gcloud)"
    if _on("/sys/class/dmi/id/product_name", "Google Compute Engine"):
        return True, "this Compute Engine VM's service account"
    return False, (
        "none found (GOOGLE_APPLICATION_CREDENTIALS, or gcloud auth application-default login)"
    )


def azure() -> Found:
    """A service principal or workload identity in the environment, a managed identity
    (ARM_USE_MSI), or the az CLI's login."""
    if os.environ.get("ARM_CLIENT_ID") or os.environ.get("AZURE_CLIENT_ID"):
        return True, "a service principal from the environment"
    if os.environ.get("ARM_USE_MSI", "").lower() == "true":
        return True, "a managed identity (ARM_USE_MSI)"
    config = os.environ.get("AZURE_CONFIG_DIR") or str(Path.home() / ".azure")
    if (Path(config) / "azureProfile.json").exists():
        return True, "the az CLI's login"
    return False, "none found (ARM_CLIENT_ID..., ARM_USE_MSI=true, or az login)"


CREDENTIALS: dict[str, Callable[[], Found]] = {"aws": aws, "gcp": gcp, "azure": azure}
