"""The annotations Squall reads: which keys, where, and what their values must be.

Fuzzball matches annotations against its provisioners; Squall has no provisioners, so it
reads a few keys of its own (`squall.io/...`, for federation: `orchestrator/federation.py`)
and the GPU model keys, and refuses the rest where they would ask for a node or a volume.
Workflow and endpoint annotations are free metadata (`description`, Fuzzball's
`fuzzball.io/connect/...` hint), except that the `squall.io/` prefix is Squall's: a key there
must be one Squall reads at that place.

`problem(place, key, value)` says what is wrong with one annotation, or returns None.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from enum import StrEnum

from .units import UnitError, parse_duration, parse_size

__all__ = ["ARCHES", "CLOUDS", "GPU_MODEL_KEYS", "KEYS", "Place", "Problem", "problem"]

PREFIX = "squall.io/"
ARCHES = ("x86_64", "arm64")  # the architectures of the catalog's instance types
CLOUDS = ("aws", "azure", "gcp")
GPU_MODEL_KEYS = ("nvidia.com/gpu.model", "amd.com/gpu.model")
_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class Place(StrEnum):
    """Where an annotation is written."""

    WORKFLOW = "the workflow's annotations"
    JOB = "a job's resource.annotations"
    SERVICE = "a service's resource.annotations"
    VOLUME = "a volume's annotations"
    ENDPOINT = "an endpoint's annotations"


# (message, hint): what is wrong and how to put it right
Problem = tuple[str, str]
Check = Callable[[str], str | None]  # value -> what is wrong with it


def _duration(value: str) -> str | None:
    try:
        parse_duration(value)
    except UnitError as exc:
        return str(exc)
    return None


def _size(value: str) -> str | None:
    try:
        parse_size(value)
    except UnitError as exc:
        return str(exc)
    return None


def _arch(value: str) -> str | None:
    if value in ARCHES:
        return None
    close = difflib.get_close_matches(value, ARCHES, n=1)
    guess = " (aarch64 is written arm64)" if value == "aarch64" else ""
    guess = guess or (f"; did you mean {close[0]!r}?" if close else "")
    return f"{value!r} is not an architecture Squall knows{guess}; use {' or '.join(ARCHES)}"


def _location(value: str) -> str | None:
    cloud, sep, region = value.partition(":")
    if not sep or cloud not in CLOUDS or not _REGION.match(region):
        return (
            f"{value!r} is not a location; write CLOUD:REGION with CLOUD one of "
            f"{', '.join(CLOUDS)}, e.g. aws:us-west-2"
        )
    return None


def _tags(value: str) -> str | None:
    tags = [t.strip() for t in value.split(",")]
    bad = [t for t in tags if not _TAG.match(t)]
    if bad:
        return (
            f"{value!r} is not a list of tags; write words (letters, digits, -, _ and .) "
            "separated by commas, e.g. eu,gdpr"
        )
    return None


# What federation reads on a job's or a service's node: both hold a node group.
_NODE_KEYS: dict[str, Check] = {
    "squall.io/expected-runtime": _duration,  # hours per task, for prices
    "squall.io/arch": _arch,  # the images' architecture: instance types that run them
}
# The keys Squall reads, by place, with the check of their values.
KEYS: dict[Place, dict[str, Check]] = {
    Place.JOB: _NODE_KEYS,
    Place.SERVICE: _NODE_KEYS,
    Place.VOLUME: {
        "squall.io/ingress-size": _size,  # bytes its ingress brings in, all transfers
        "squall.io/egress-size": _size,
        "squall.io/location": _location,  # where its s3 data lives
        "squall.io/tags": _tags,  # residency tags that policies match
    },
}
_NODE_HINT = (
    "Squall reads squall.io/expected-runtime, squall.io/arch, "
    + " and ".join(GPU_MODEL_KEYS)
    + " here"
)
_HINTS = {
    Place.JOB: _NODE_HINT,
    Place.SERVICE: _NODE_HINT,
    Place.VOLUME: "Squall reads squall.io/ingress-size, squall.io/egress-size, "
    "squall.io/location and squall.io/tags here",
}


def problem(place: Place, key: str, value: str) -> Problem | None:
    """What is wrong with annotation `key: value` at `place`, with a hint; None if nothing."""
    known = KEYS.get(place, {})
    if key in known:
        wrong = known[key](value)
        return (wrong, _value_hint(key)) if wrong else None
    if key.startswith(PREFIX):
        return f"Squall does not read {key!r} on {place}", _where_else(place, key)
    if place in (Place.JOB, Place.SERVICE) and key in GPU_MODEL_KEYS:
        return None
    if place in (Place.JOB, Place.SERVICE):
        return (
            f"Squall matches no node by resource annotation {key!r} (it has no provisioners "
            "to match it against)",
            _HINTS[Place.JOB] + "; remove it, or name a GPU model with nvidia.com/gpu.model",
        )
    if place is Place.VOLUME:
        return (
            f"Squall picks no provisioner by volume annotation {key!r}: a site has one kind "
            "of volume storage",
            _HINTS[Place.VOLUME] + "; remove it",
        )
    return None  # free metadata


def _value_hint(key: str) -> str:
    examples = {
        "squall.io/expected-runtime": "a duration, e.g. 90m or 2h30m",
        "squall.io/arch": "x86_64 or arm64",
        "squall.io/ingress-size": "a size, e.g. 200GB",
        "squall.io/egress-size": "a size, e.g. 200GB",
        "squall.io/location": "CLOUD:REGION, e.g. aws:us-west-2",
        "squall.io/tags": "comma-separated tags, e.g. eu,gdpr",
    }
    return f"write {key}: {examples[key]}"


def _where_else(place: Place, key: str) -> str:
    """A did-you-mean for an unknown squall.io key: the closest key Squall reads (names
    compared without the prefix, which they all share), and where it belongs."""
    places: dict[str, list[Place]] = {}
    for p, keys in KEYS.items():
        for k in keys:
            places.setdefault(k.removeprefix(PREFIX), []).append(p)
    here = [k for k, ps in places.items() if place in ps]
    name = key.removeprefix(PREFIX)
    for choices in (here, list(places)):
        close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
        if close and place in places[close[0]]:
            return f"did you mean {PREFIX + close[0]!r}?"
        if close:
            where = " or ".join(str(p) for p in places[close[0]])
            return f"{PREFIX + close[0]!r} is read on {where}, not here"
    return _HINTS.get(place, "Squall reads no squall.io annotation here")
