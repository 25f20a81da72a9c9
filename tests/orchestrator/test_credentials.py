"""Where each cloud's credentials are looked for before a cloud run (and by `squall doctor`):
found or not, and where from, without reading a secret value or calling a cloud."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.provision import credentials


@pytest.fixture
def nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user with no credentials anywhere, not on a cloud VM."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in (
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GOOGLE_CREDENTIALS",
        "GOOGLE_CLOUD_KEYFILE_JSON",
        "GOOGLE_OAUTH_ACCESS_TOKEN",
        "CLOUDSDK_CONFIG",
        "ARM_CLIENT_ID",
        "AZURE_CLIENT_ID",
        "ARM_USE_MSI",
        "AZURE_CONFIG_DIR",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(credentials, "_on", lambda path, words: False)
    return tmp_path


def test_nothing_found_says_where_to_put_them(nowhere: Path) -> None:
    for cloud, hint in (
        ("aws", "AWS_ACCESS_KEY_ID"),
        ("gcp", "gcloud auth application-default login"),
        ("azure", "az login"),
    ):
        found, detail = credentials.CREDENTIALS[cloud]()
        assert not found
        assert detail.startswith("none found (")
        assert hint in detail


def test_each_source_is_found_and_named(nowhere: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    assert credentials.aws() == (True, "from env")
    adc = nowhere / ".config" / "gcloud" / "application_default_credentials.json"
    adc.parent.mkdir(parents=True)
    adc.write_text("{}")
    assert credentials.gcp() == (True, "application default credentials (gcloud)")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(nowhere / "key.json"))
    assert credentials.gcp() == (True, "from the environment (GOOGLE_APPLICATION_CREDENTIALS)")
    monkeypatch.setenv("ARM_USE_MSI", "true")
    assert credentials.azure() == (True, "a managed identity (ARM_USE_MSI)")
    monkeypatch.setenv("ARM_CLIENT_ID", "00000000-0000-0000-0000-000000000000")
    assert credentials.azure() == (True, "a service principal from the environment")
    for found in (credentials.aws(), credentials.gcp(), credentials.azure()):
        assert "not-a-real-secret" not in found[1]
