"""Sizes and durations parse to numbers in one place, with errors that say what is right."""

from __future__ import annotations

import pytest

from orchestrator.fuzzfile.units import UnitError, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("14GiB", 14 * 2**30),
        ("1GB", 10**9),
        ("512MiB", 512 * 2**20),
        ("512MIB", 512 * 2**20),  # a shipped catalog template writes this
        ("0.5GiB", 2**29),
        ("92GB", 92 * 10**9),
        ("1TiB", 2**40),
        ("10 kb", 10_000),
        ("1024", 1024),
        (1024, 1024),
        ("7B", 7),
        ("1.5B", 2),  # fractional bytes round up
    ],
)
def test_sizes(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "14 GiBs", "4GiG", "-1", "1e3GB", True, None, [1]])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(UnitError, match=r"size|unit"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2m", 120),
        ("10m0s", 600),
        ("1h30m", 5400),
        ("8h0m0s", 28800),
        ("120s", 120),
        ("1.5h", 5400),
        ("300ms", 0.3),
        ("0", 0),
        (0, 0),
        ("2h45m30.5s", 9930.5),
    ],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("600", "no unit"),
        (600, "no unit"),
        ("10 minutes", "no unit"),
        ("1d", "not a duration"),
        ("-5m", "negative"),
        ("", "empty"),
        ("m", "not a duration"),
        (None, "expected a duration"),
    ],
)
def test_bad_durations(text: object, why: str) -> None:
    with pytest.raises(UnitError, match=why):
        parse_duration(text)


@pytest.mark.parametrize(("n", "text"), [(2**30, "1GiB"), (1536 * 2**20, "1536MiB"), (7, "7B")])
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text
    assert parse_size(text) == n
