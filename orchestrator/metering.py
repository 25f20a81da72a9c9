"""The meter: what a run has spent so far, written into it every few seconds, and the budget
that stops it.

A run holds its cluster from the moment provisioning starts until teardown is done; what it
spends is the placement's running rates (`federate.spend.Rates`: the price of what it holds
per hour, the fee of each byte it moves) times the hours held and the bytes its transfers
moved. When that reaches the run's budget, the meter asks the run's engine to cancel it,
with the reason; the engine then egresses what finished and takes the cluster down (its
hours until then are counted too, so a run ends a little over its budget, never silently).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import or_, select

from federate.spend import Rates, usd

from .redaction import scrub
from .store import Event, Run, RunState, Store, Transfer

__all__ = ["BUDGET_REACHED", "Meter", "spent"]

BUDGET_REACHED = "budget reached"  # how a cancel by the meter's reason begins
_STOPPABLE = (RunState.PROVISIONING, RunState.STAGING, RunState.RUNNING)


def _now() -> datetime:
    return datetime.now(UTC)


def spent(run: Run, moved: dict[str, int], now: datetime) -> float:
    """USD `run` has spent by `now`, having moved `moved` (bytes by remote URI) at the site
    it is at, besides what it spent at sites it moved away from."""
    rates = Rates.from_dict((run.placement or {}).get("rates"))
    held = 0.0
    if run.held_from is not None:
        held = ((run.held_until or now) - run.held_from).total_seconds() / 3600
    return run.carried_usd + rates.spent(held, moved)


class Meter:
    """The meter of run `run_id`, read by its engine's tending thread (`read`)."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self.stopped = False  # whether it asked for the run to be cancelled

    def hold(self) -> None:
        """The run starts holding a cluster (provisioning begins)."""
        with self.store.session() as s:
            run = s.get_one(Run, self.run_id)
            run.held_from = run.held_from or _now()

    def move_on(self) -> None:
        """The run leaves the site it held (its cluster is down): what it spent there is
        carried, and it holds nothing until it is provisioned elsewhere."""
        self.release()
        with self.store.session() as s:
            run = s.get_one(Run, self.run_id)
            run.carried_usd = run.cost_usd
            run.held_from = run.held_until = None

    def release(self) -> float:
        """The run holds nothing any more (teardown is done): its final cost."""
        with self.store.session() as s:
            run = s.get_one(Run, self.run_id)
            if run.held_from is not None and run.held_until is None:
                run.held_until = _now()
        return self.read()

    def read(self) -> float:
        """Write what the run has spent, and cancel it if that reached its budget."""
        with self.store.session() as s:
            run = s.get_one(Run, self.run_id)
            moved: dict[str, int] = {}
            for t in s.scalars(select(Transfer).where(Transfer.run_id == self.run_id)):
                uri = t.source if t.direction == "ingress" else t.destination
                moved[uri] = moved.get(uri, 0) + t.bytes_done
            run.cost_usd = cost = spent(run, moved, _now())
            budget = run.budget_usd
            # up to RUNNING: egress and teardown finish what they do, at the run's cost
            if budget is not None and cost >= budget and run.state in _STOPPABLE:
                if not run.cancel_requested:
                    run.cancel_requested = True
                    run.cancel_reason = (
                        f"{BUDGET_REACHED}: {usd(cost)} spent of a {usd(budget)} budget"
                    )
                    message = scrub(run.id, run.cancel_reason)
                    s.add(Event(run_id=run.id, kind="budget", message=message))
                self.stopped = self.stopped or run.cancel_reason.startswith(BUDGET_REACHED)
        return cost


def month_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def team_month(store: Store, team: str, now: datetime, *, besides: str = "") -> float:
    """What team `team`'s runs spend in this calendar month (UTC): those that ended in it
    their cost, the live ones the larger of their cost so far and their estimate. `besides`:
    a run left out (the one being placed)."""
    from .store import RUN_ENDED

    total = 0.0
    with store.session() as s:
        rows = s.execute(
            select(Run.id, Run.state, Run.cost_usd, Run.placement).where(
                Run.team == team,
                or_(Run.state.not_in(RUN_ENDED), Run.finished_at >= month_start(now)),
            )
        ).all()
    for run_id, state, cost, placement in rows:
        if run_id == besides:
            continue
        estimate = ((placement or {}).get("estimate") or {}).get("total_usd", 0.0)
        total += cost if state in RUN_ENDED else max(cost, estimate)
    return total
