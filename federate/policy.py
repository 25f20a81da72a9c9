"""A team's placement policy: where it may run, where its data may go, what it may spend.

Read from YAML (one file per team) and overridden by flags:

    allowed-clouds: [aws, gcp]        # empty: any
    allowed-regions: [us-west-2]      # empty: any
    allowed-sites: [local, lab]       # on-prem and local sites by name; empty: any
    residency:                        # data tagged with a key must stay in these regions
      eu: [eu-west-1, europe-west4, westeurope, swedencentral]
    budget-usd: 500                   # per run: refused above it, stopped when it is spent
    team: genomics                    # whose runs these are (default: none)
    monthly-budget-usd: 5000          # the team's runs in a calendar month (UTC), together
    spot: false
    gpu-models: [H100, A100]          # empty: any
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = [
    "NOTHING",
    "Policy",
    "PolicyError",
    "load_policy",
    "narrow",
    "parse_policy",
    "policy_text",
]

NOTHING = frozenset({""})  # an allow-list no name is on (empty means any)


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class Policy:
    allowed_clouds: frozenset[str] = frozenset()
    allowed_regions: frozenset[str] = frozenset()
    allowed_sites: frozenset[str] = frozenset()
    residency: Mapping[str, frozenset[str]] = field(default_factory=dict)
    budget_usd: float | None = None
    spot: bool = False
    gpu_models: frozenset[str] = frozenset()
    team: str = ""
    monthly_budget_usd: float | None = None


_KEYS = {
    "allowed-clouds",
    "allowed-regions",
    "allowed-sites",
    "residency",
    "budget-usd",
    "spot",
    "gpu-models",
    "team",
    "monthly-budget-usd",
}


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    return parse_policy(text, str(path))


def parse_policy(text: str, path: str) -> Policy:
    """A policy from its YAML `text`; `path` names it in errors."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: a policy is a mapping of {', '.join(sorted(_KEYS))}")
    unknown = set(data) - _KEYS
    if unknown:
        raise PolicyError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")

    def names(key: str) -> frozenset[str]:
        value = data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PolicyError(f"{path}: {key} must be a list of names")
        return frozenset(value)

    residency = data.get("residency") or {}
    if not isinstance(residency, dict):
        raise PolicyError(f"{path}: residency maps a data tag to a list of regions")

    def usd(key: str) -> float | None:
        value = data.get(key)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise PolicyError(f"{path}: {key} must be a number of USD above 0")
        return float(value)

    team = data.get("team", "")
    if not isinstance(team, str):
        raise PolicyError(f"{path}: team must be a name")
    return Policy(
        allowed_clouds=names("allowed-clouds"),
        allowed_regions=names("allowed-regions"),
        allowed_sites=names("allowed-sites"),
        residency={str(k): frozenset(map(str, v or [])) for k, v in residency.items()},
        budget_usd=usd("budget-usd"),
        spot=bool(data.get("spot", False)),
        gpu_models=names("gpu-models"),
        team=team,
        monthly_budget_usd=usd("monthly-budget-usd"),
    )


def narrow(base: Policy, extra: Policy) -> Policy:
    """`base` made stricter by `extra` (a schedule's own policy), never looser: allow-lists
    intersect, residency rules add up, budgets take the smaller, spot only if both allow it;
    the team is the base's when it names one."""

    def allowed(a: frozenset[str], b: frozenset[str]) -> frozenset[str]:
        if not a or not b:
            return a or b
        return (a & b) or NOTHING

    def smaller(a: float | None, b: float | None) -> float | None:
        return b if a is None else a if b is None else min(a, b)

    residency = dict(base.residency)
    for tag, regions in extra.residency.items():
        residency[tag] = residency[tag] & regions if tag in residency else regions
    return Policy(
        allowed_clouds=allowed(base.allowed_clouds, extra.allowed_clouds),
        allowed_regions=allowed(base.allowed_regions, extra.allowed_regions),
        allowed_sites=allowed(base.allowed_sites, extra.allowed_sites),
        residency=residency,
        budget_usd=smaller(base.budget_usd, extra.budget_usd),
        spot=base.spot and extra.spot,
        gpu_models=allowed(base.gpu_models, extra.gpu_models),
        team=base.team or extra.team,
        monthly_budget_usd=smaller(base.monthly_budget_usd, extra.monthly_budget_usd),
    )


def policy_text(policy: Policy) -> str:
    """`policy` as the YAML `parse_policy` reads back to it."""
    data: dict[str, object] = {
        "allowed-clouds": sorted(policy.allowed_clouds),
        "allowed-regions": sorted(policy.allowed_regions),
        "allowed-sites": sorted(policy.allowed_sites),
        "residency": {k: sorted(v) for k, v in sorted(policy.residency.items())},
        "spot": policy.spot,
        "gpu-models": sorted(policy.gpu_models),
    }
    if policy.budget_usd is not None:
        data["budget-usd"] = policy.budget_usd
    if policy.monthly_budget_usd is not None:
        data["monthly-budget-usd"] = policy.monthly_budget_usd
    if policy.team:
        data["team"] = policy.team
    return yaml.safe_dump(data, sort_keys=False)
