"""Stacks through the Automation API, and the ledger. No cloud and no `pulumi` CLI can be had
here: the SDK's own seam for the CLI runs tests/orchestrator/fake_pulumi.py instead (the
`fake_pulumi` fixture), which keeps stacks in the file backend's folder as JSON. The programs
themselves are tested under Pulumi's mocks in tests/infra."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.provision import ProvisionError
from orchestrator.provision.stacks import StackDriver, StackSettings
from orchestrator.store import Stack, StackState, Store
from tests.infra.specs import TOKEN, cpu_job, gpu_mpi, placed


@pytest.fixture
def driver(tmp_path: Path, fake_pulumi) -> StackDriver:
    return StackDriver(
        Store(f"sqlite:///{tmp_path / 'squall.db'}"), StackSettings(tmp_path / "stacks")
    )


def ledger_state(driver: StackDriver, name: str) -> StackState:
    with driver.store.session() as s:
        return s.scalars(select(Stack).where(Stack.name == name)).one().state


def test_a_stack_is_recorded_configured_brought_up_and_destroyed_in_order(driver, fake_pulumi):
    spec = placed("aws", gpu_mpi(nodes=4))
    seen: list[tuple[str, StackState]] = []

    def report(line: str) -> None:
        seen.append((line, ledger_state(driver, spec.stack_name)))

    driver.up(spec, report)
    # the ledger had the stack before `up` printed its first line
    first_up_line = next(state for line, state in seen if line.startswith("Updating"))
    assert first_up_line is StackState.CREATING
    assert ledger_state(driver, spec.stack_name) is StackState.UP
    assert any("created" in line for line, _ in seen)  # up's progress reached the report

    driver.destroy(spec.stack_name, report)
    assert ledger_state(driver, spec.stack_name) is StackState.DESTROYED
    assert fake_pulumi.verbs() == [
        "version",
        "stack select",  # not there yet: the SDK then creates it
        "stack init",
        "config set-all",
        "up",
        "stack output",
        "stack output",
        "stack history",
        "stack select",
        "destroy",
        "stack history",
        "stack rm",
    ]
    up = next(c for c in fake_pulumi.calls() if c[0] == "up" or c[1:2] == ["up"])
    assert "--stack" in up
    assert spec.stack_name in up
    assert fake_pulumi.stacks(driver.settings.state_dir / "state") == {}  # removed
    # the join token never went on a command line (the inline program holds it)
    assert all(TOKEN not in " ".join(c) for c in fake_pulumi.calls())
    assert all(
        spec.bootstrap.join_token.get_secret_value() not in " ".join(c) for c in fake_pulumi.calls()
    )
    # a file backend under the data dir, and a passphrase made once, 0600
    passphrase = driver.settings.state_dir / "passphrase"
    assert passphrase.stat().st_mode & 0o777 == 0o600


def test_a_failed_up_is_destroyed_at_once_and_says_why_in_one_line(
    driver, fake_pulumi, monkeypatch
):
    monkeypatch.setenv("FAKE_PULUMI_FAIL", "up")
    spec = placed("aws", gpu_mpi(nodes=4))
    lines: list[str] = []
    with pytest.raises(ProvisionError, match="InsufficientInstanceCapacity") as err:
        driver.up(spec, lines.append)
    assert "\n" not in str(err.value)
    assert ledger_state(driver, spec.stack_name) is StackState.DESTROYED
    assert "destroy" in fake_pulumi.verbs()
    assert fake_pulumi.stacks(driver.settings.state_dir / "state") == {}
    assert any("destroying it" in line for line in lines)


def test_a_failed_destroy_keeps_the_ledger_open_and_gc_finishes_the_job(
    driver, fake_pulumi, monkeypatch
):
    spec = placed("aws", cpu_job())
    driver.up(spec, lambda _: None)
    monkeypatch.setenv("FAKE_PULUMI_FAIL", "destroy")
    with pytest.raises(ProvisionError, match="DependencyViolation"):
        driver.destroy(spec.stack_name, lambda _: None)
    [entry] = driver.ledger()
    assert (entry["state"], entry["run"]) == ("FAILED", None)
    assert "DependencyViolation" in entry["error"]
    # its run is not in this store at all: nothing will take it down but gc
    assert driver.stale() == [spec.stack_name]
    monkeypatch.delenv("FAKE_PULUMI_FAIL")
    for name in driver.stale():
        driver.destroy(name, lambda _: None)
    assert driver.ledger() == []
    assert fake_pulumi.stacks(driver.settings.state_dir / "state") == {}


def test_expired_stacks_are_stale_even_while_their_run_goes_on(driver, fake_pulumi):
    spec = placed("gcp", cpu_job())
    driver.up(spec, lambda _: None)
    assert driver.stale(now=spec.expires_at + timedelta(seconds=1)) == [spec.stack_name]
    assert driver.name_of(spec.run_id) == spec.stack_name


def test_without_the_pulumi_cli_a_cloud_stack_fails_at_once_and_records_nothing(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    driver = StackDriver(Store(f"sqlite:///{tmp_path / 'squall.db'}"), StackSettings(tmp_path))
    with pytest.raises(ProvisionError, match=r"pulumi CLI, which is not on PATH: install") as err:
        driver.up(placed("aws", cpu_job()), lambda _: None)
    assert "\n" not in str(err.value)
    assert driver.ledger(everything=True) == []


def test_a_stack_already_in_the_ledger_is_refused(driver):
    spec = placed("aws", cpu_job())
    driver.up(spec, lambda _: None)
    with pytest.raises(ProvisionError, match="already in the ledger"):
        driver.up(spec, lambda _: None)
    assert datetime.now(UTC) < spec.expires_at + timedelta(days=400)


def test_a_published_image_is_a_stack_of_its_own_that_gc_leaves_and_destroy_removes(
    driver, tmp_path
):
    from infra.image_spec import ImageSpec

    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * 512)
    image = ImageSpec(
        name="squall-node",
        digest="sha256:" + "cd34" * 16,
        cloud="aws",
        region="us-east-2",
        disk=disk,
        disk_format="raw",
        owner="platform",
    )
    lines: list[str] = []
    ami = driver.publish(image, lines.append)
    assert ami.startswith("ami-")
    name = image.stack_name
    assert ledger_state(driver, name) is StackState.UP
    (entry,) = [e for e in driver.ledger() if e["stack"] == name]
    assert (entry["site"], entry["run"], entry["expires_at"]) == ("aws:us-east-2", None, None)
    # no run and no expiry: gc never takes a published image
    assert name not in driver.stale(datetime.now(UTC) + timedelta(days=3650))
    with pytest.raises(ProvisionError, match="is published already"):
        driver.publish(image, lines.append)
    driver.destroy(name, lines.append)
    assert ledger_state(driver, name) is StackState.DESTROYED
    assert driver.publish(image, lines.append).startswith("ami-")  # published again
    assert ledger_state(driver, name) is StackState.UP
