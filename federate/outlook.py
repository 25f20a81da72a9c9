"""How sites change over time, for a firing that may wait within its window for a cheaper
moment: spot prices by hour of day (from observed history), and sites busy until a moment.

    history = SpotHistory.load(Path("spot-history.csv"))   # cloud,region,instance,at,usd_per_hour
    outlook = Outlook(spot=history, busy={"local": (until, "running me/nightly-3")})
    outlook.sites_at(sites, at)   # the sites as they are expected to be at `at`

A spot price at a moment is foreseen as the median of the prices observed at the same hour
of the day (UTC) in the history; a type with no observation at that hour keeps its catalog
price. A site named in `busy` cannot take a run before its moment.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from .placement import Site

__all__ = ["Outlook", "SpotHistory"]

HEADER = ("cloud", "region", "instance", "at", "usd_per_hour")


@dataclass(frozen=True, slots=True)
class SpotHistory:
    """Observed spot prices: (cloud, region, instance) -> hour of day (UTC) -> the median."""

    by_hour: Mapping[tuple[str, str, str], Mapping[int, float]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> SpotHistory:
        """Read a CSV with the columns of HEADER (`at` in ISO 8601 with its zone). Raises
        ValueError naming the file and line of a row that cannot be read."""
        seen: defaultdict[tuple[str, str, str], defaultdict[int, list[float]]] = defaultdict(
            lambda: defaultdict(list)
        )
        with path.open(newline="") as f:
            rows = csv.DictReader(f)
            if tuple(rows.fieldnames or ()) != HEADER:
                raise ValueError(f"{path}: the columns are {','.join(HEADER)}")
            for line, row in enumerate(rows, start=2):
                try:
                    at = datetime.fromisoformat(row["at"])
                    price = float(row["usd_per_hour"])
                    if at.tzinfo is None or price < 0:
                        raise ValueError("a time with its zone and a price of at least 0")
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{path}:{line}: {exc}") from None
                key = (row["cloud"], row["region"], row["instance"])
                seen[key][at.utctimetuple().tm_hour].append(price)
        return cls(
            {
                key: {hour: statistics.median(prices) for hour, prices in hours.items()}
                for key, hours in seen.items()
            }
        )

    def price(self, cloud: str, region: str, instance: str, at: datetime) -> float | None:
        return self.by_hour.get((cloud, region, instance), {}).get(at.utctimetuple().tm_hour)


@dataclass(frozen=True, slots=True)
class Outlook:
    spot: SpotHistory = field(default_factory=SpotHistory)
    busy: Mapping[str, tuple[datetime, str]] = field(default_factory=dict)  # site -> until, why

    def sites_at(self, sites: Sequence[Site], at: datetime) -> list[Site]:
        out = []
        for site in sites:
            if site.kind == "cloud" and self.spot.by_hour:
                types = []
                for t in site.types:
                    foreseen = self.spot.price(site.cloud, site.region, t.name, at)
                    spot = t.price_spot if foreseen is None or t.price_spot is None else foreseen
                    types.append(replace(t, price_spot=spot) if spot != t.price_spot else t)
                site = replace(site, types=tuple(types))
            held = self.busy.get(site.name)
            if held is not None and at < held[0]:
                until, why = held
                site = replace(site, busy=f"busy until {until:%Y-%m-%d %H:%M} UTC ({why})")
            out.append(site)
        return out
