"""What a run spends while it runs: the hourly price of what it holds and the fee of each
byte it moves, taken from the estimate it was placed by, and the sum of both so far.

A cloud cluster is one node group per job (as `cluster_spec` makes it), held from the moment
provisioning starts until its stack is destroyed, so the held rate is the sum of each group's
price times its nodes, plus the managed file system of the run's volumes, if any. Any other
site is held whole for the run: its node price times its nodes (zero unless the sites file
gives it a rate). Data is billed per byte actually moved, at the rate of the class the
estimate priced it by; an internet transfer at its first paid band.

    rates = rates_of(estimate, workload, catalog)
    rates.spent(held_hours=0.5, moved={"s3://genomes/ref.fa": 12 * 10**9})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .catalog import Catalog
from .placement import GB, SiteEstimate, transfer_fee
from .workload import Workload

__all__ = ["Rates", "rates_of", "usd"]


@dataclass(frozen=True, slots=True)
class Rates:
    usd_per_hour: float = 0.0  # what the run holds (nodes, managed storage), per hour
    usd_per_gb: Mapping[str, float] = field(default_factory=dict)  # data fee by remote URI

    def spent(self, held_hours: float, moved: Mapping[str, int]) -> float:
        """USD spent after holding the cluster `held_hours` and moving `moved` (bytes by
        the transfer's remote URI)."""
        data = sum(self.usd_per_gb.get(uri, 0.0) * n / GB for uri, n in moved.items())
        return self.usd_per_hour * max(held_hours, 0.0) + data

    def as_dict(self) -> dict[str, Any]:
        return {"usd_per_hour": self.usd_per_hour, "usd_per_gb": dict(self.usd_per_gb)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Rates:
        if not data:
            return cls()
        return cls(
            float(data.get("usd_per_hour", 0.0)),
            {str(k): float(v) for k, v in (data.get("usd_per_gb") or {}).items()},
        )


def rates_of(estimate: SiteEstimate, workload: Workload, catalog: Catalog) -> Rates:
    """The running rates of a run placed by `estimate` (a feasible one)."""
    site = estimate.site
    if site.kind == "cloud":
        hourly = sum(p.usd_per_hour * p.nodes for p in estimate.jobs)
        if estimate.storage_usd and estimate.hours > 0:
            hourly += estimate.storage_usd / estimate.hours
    else:
        node = site.types[0].price_ondemand if site.types else 0.0
        hourly = (node or 0.0) * max(site.max_nodes or 1, 1)
    per_gb: dict[str, float] = {}
    for move in workload.data:
        if move.direction == "ingress" and str(move.place) in site.free_from:
            continue
        src, dst = (
            (move.place, site.place) if move.direction == "ingress" else (site.place, move.place)
        )
        fees, how, rate = transfer_fee(src, dst, catalog)
        if how == "internet" and fees is not None:
            rate = next((t.usd_per_gb for t in fees.internet if t.usd_per_gb > 0), 0.0)
        if rate:
            per_gb[move.uri] = rate
    return Rates(hourly, per_gb)


def usd(value: float) -> str:
    """`$1,234.50`; a small amount with the digits that show it (`$0.0042`, `$0.00004`);
    a negative one `-$2.50`."""
    sign, value = ("-", -value) if value < 0 else ("", value)
    if 0 < value < 0.01:
        return f"{sign}${value:.8f}".rstrip("0")
    return f"{sign}${value:,.2f}"
