"""Schedules: a workflow run on a cron, each firing at the cheapest site and moment.

A schedule names a Fuzzfile, a cron expression (five fields, in UTC), and optionally a
window, a budget per run and a policy file. A scheduler (`squall server`, or `squall
scheduler` where there is no server) looks at the store every TICK seconds; its clock is
injected, so tests move time by hand. The rules:

- **A moment fires once.** A firing is written, unique per (schedule, moment), before
  anything starts, and moves from WAITING to STARTED in one conditional update; so however
  many schedulers run and wherever one crashes, no moment starts two runs. The run is named
  SCHEDULE-YYYYMMDD-HHMM.
- **Cheapest site and moment.** A firing may start any time in [its moment, its moment +
  window]. At every tick while it waits, every site is priced now and at STEPS moments of
  what is left of the window, as the outlook foresees them (`federate.outlook`: spot prices
  by hour of day from observed history, this machine busy until the runs on it are expected
  to end). It starts now unless a later moment is cheaper by more than CHEAPER, and at the
  end of its window it starts at the best site then, whatever the price. The firing records
  the site, the estimate and why it chose that moment (the prices it compared).
- **Missed moments.** Moments that passed while no scheduler ran: only the latest may still
  start, and only while inside its window (GRACE when it has none); the others are recorded
  MISSED, with why. Nothing is run twice to catch up.
- **One firing at a time.** A firing does not start while the schedule's previous run is
  still live: it waits within its window for that run to end, and is SKIPPED when its window
  ends first (Kubernetes CronJob's `concurrencyPolicy: Forbid`).
- **Budgets.** The schedule's budget is each run's budget: sites estimated above it are not
  chosen, and the run is stopped when it has spent it. A firing no site can take at any
  moment of its window FAILS with the reasons. A paused schedule makes no firings, and
  the ones waiting are SKIPPED; resumed, it fires from its next moment on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from cronsim import CronSim, CronSimError
from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError

from federate.outlook import Outlook, SpotHistory
from federate.policy import PolicyError, parse_policy
from federate.spend import usd

from .data import RemoteFacts
from .errors import AlreadyExists, InvalidInput, NotFound, SquallError
from .fuzzfile import load_text
from .identity import is_disabled
from .placing import Placer
from .store import RUN_ENDED, Firing, FiringState, Run, Schedule, Store
from .view_types import FiringView, ScheduleView

__all__ = [
    "CHEAPER",
    "GRACE",
    "STEPS",
    "TICK",
    "Quote",
    "ScheduleSpec",
    "Scheduler",
    "create_schedule",
    "delete_schedule",
    "list_schedules",
    "local_queue",
    "next_moments",
    "placer_pricer",
    "plain_name",
    "set_paused",
    "show_schedule",
]

log = logging.getLogger(__name__)

TICK = 30.0  # seconds between a scheduler's looks at the store
GRACE = timedelta(minutes=5)  # how late a firing without a window may still start
STEPS = 12  # later moments of a window priced at each tick
CHEAPER = 0.01  # a later moment must be this much cheaper (a fraction) to wait for it
MAX_MISSED = 1000  # missed moments recorded one by one; past that, counted in one line
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_LONGEST_NAME = 128  # a firing's run is named after it, with its moment added
_STALE_CLAIM = timedelta(minutes=2)  # STARTED without its run: the scheduler died between
LOOKED_FOR = 600.0  # seconds a source's size and region are kept while pricing firings


def plain_name(name: str, longest: int) -> bool:
    """Whether `name` can name a run or a schedule: letters, digits and `._/-`, starting with
    a letter or digit, at most `longest` characters."""
    return len(name) <= longest and _PLAIN.match(name) is not None


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """A schedule as the scheduler and the views read it."""

    name: str
    owner: str
    fuzzfile: str
    cron: str
    window: timedelta
    budget_usd: float | None
    policy: str
    paused: bool
    next_at: datetime
    created_at: datetime

    @classmethod
    def of(cls, row: Schedule) -> ScheduleSpec:
        return cls(
            row.name,
            row.owner,
            row.fuzzfile,
            row.cron,
            timedelta(seconds=row.window_s),
            row.budget_usd,
            row.policy,
            row.paused,
            row.next_at,
            row.created_at,
        )

    def explain(self) -> str:
        """The cron in words: `At 02:00 every day`."""
        try:
            return str(CronSim(self.cron, self.next_at).explain())
        except (CronSimError, ValueError):
            return self.cron


@dataclass(frozen=True, slots=True)
class Quote:
    """The cheapest feasible site at moment `at` and its estimate; site None: none, `why`."""

    at: datetime
    site: str | None
    usd: float | None
    why: str = ""


Pricer = Callable[[ScheduleSpec, datetime], Quote]
Starter = Callable[[str, ScheduleSpec], None]  # submit run NAME of the schedule, and run it


def parse_cron(expression: str, start: datetime) -> CronSim:
    try:
        if len(expression) > 255 or len(expression.split()) != 5:
            raise ValueError("not five fields")
        return CronSim(expression, start)
    except (CronSimError, ValueError) as exc:
        raise InvalidInput(
            f"cron {expression!r}: {exc}; five fields, minute hour day month weekday, in UTC "
            "(e.g. '0 2 * * *': 02:00 every day)"
        ) from None


def next_moments(expression: str, after: datetime, count: int) -> list[datetime]:
    sim = parse_cron(expression, after)
    return [next(sim) for _ in range(count)]


# ---- records ---------------------------------------------------------------------------------


def create_schedule(
    store: Store,
    name: str,
    fuzzfile: str,
    cron: str,
    *,
    owner: str,
    window_seconds: float = 0.0,
    budget_usd: float | None = None,
    policy: str = "",
    now: datetime | None = None,
) -> ScheduleView:
    """Check everything and record the schedule; nothing fires before its next moment.
    `policy`: YAML text of a policy that narrows the configured one for its runs."""
    if not plain_name(name, _LONGEST_NAME):
        raise InvalidInput(
            f"schedule name {name!r}: letters, digits and . _ / -, at most 128, "
            "starting with a letter or digit"
        )
    if not 0 < len(owner) <= 255:
        raise InvalidInput("a schedule's owner is a name of 1 to 255 characters")
    load_text(fuzzfile, name).unwrap()  # a Fuzzfile that does not validate is refused now
    if not (math.isfinite(window_seconds) and 0 <= window_seconds <= 7 * 86400):
        raise InvalidInput(f"a window is between 0 and 7 days, not {window_seconds} s")
    if budget_usd is not None and not (math.isfinite(budget_usd) and budget_usd > 0):
        raise InvalidInput(f"a budget is a number of USD above 0, not {budget_usd}")
    if policy:
        try:
            parse_policy(policy, "the schedule's policy")
        except PolicyError as exc:
            raise InvalidInput(str(exc)) from None
    now = now or _now()
    first = next(parse_cron(cron, now))
    row = Schedule(
        name=name,
        owner=owner,
        fuzzfile=fuzzfile,
        cron=cron,
        window_s=window_seconds,
        budget_usd=budget_usd,
        policy=policy,
        next_at=first,
        created_at=now,
    )
    try:
        with store.session() as s:
            s.add(row)
            s.flush()
            return _view(row)
    except IntegrityError:
        raise AlreadyExists(f"a schedule named {name!r} exists already") from None


def _named(s: object, name: str) -> Schedule:
    from sqlalchemy.orm import Session

    assert isinstance(s, Session)
    row = s.scalars(select(Schedule).where(Schedule.name == name)).first()
    if row is None:
        raise NotFound(f"no schedule named {name!r}; `squall schedule list` shows them")
    return row


def list_schedules(store: Store) -> list[ScheduleView]:
    with store.session() as s:
        return [_view(r) for r in s.scalars(select(Schedule).order_by(Schedule.name))]


def show_schedule(store: Store, name: str, firings: int = 20) -> ScheduleView:
    """The schedule and its latest `firings`, newest first."""
    with store.session() as s:
        row = _named(s, name)
        rows = s.scalars(
            select(Firing)
            .where(Firing.schedule_id == row.id)
            .order_by(Firing.due_at.desc())
            .limit(firings)
        ).all()
        views = tuple(
            FiringView(
                f.due_at, f.state.value, f.start_at, f.site, f.estimate_usd, f.run_name, f.reason
            )
            for f in rows
        )
        return replace(_view(row), firings=views)


def _view(row: Schedule) -> ScheduleView:
    spec = ScheduleSpec.of(row)
    return ScheduleView(
        name=row.name,
        owner=row.owner,
        cron=row.cron,
        cron_text=spec.explain(),
        window_seconds=row.window_s,
        budget_usd=row.budget_usd,
        policy=row.policy,
        paused=row.paused,
        next_at=row.next_at,
        created_at=row.created_at,
    )


def set_paused(store: Store, name: str, paused: bool, now: datetime | None = None) -> ScheduleView:
    """Pause (waiting firings are SKIPPED) or resume (from the next moment after now)."""
    now = now or _now()
    with store.session() as s:
        row = _named(s, name)
        if paused and not row.paused:
            for f in s.scalars(
                select(Firing).where(
                    Firing.schedule_id == row.id, Firing.state == FiringState.WAITING
                )
            ):
                f.state, f.reason = FiringState.SKIPPED, "the schedule was paused"
        if not paused and row.paused:
            row.next_at = next(parse_cron(row.cron, now))
        row.paused = paused
        s.flush()
        return _view(row)


def delete_schedule(store: Store, name: str) -> None:
    """Forget the schedule and its firings; the runs it started stay."""
    with store.session() as s:
        s.delete(_named(s, name))


# ---- the scheduler ---------------------------------------------------------------------------


class Scheduler:
    """Fires the store's schedules: `tick()` once, or `run(stop)` every TICK seconds."""

    def __init__(
        self,
        store: Store,
        pricer: Pricer,
        starter: Starter,
        *,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.store, self.pricer, self.starter, self.clock = store, pricer, starter, clock

    def run(self, stop: threading.Event, every: float = TICK) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # a bad tick (the store busy) must not stop the schedules
                log.exception("a scheduler tick failed; the next one tries again")
            if stop.wait(every):
                return

    def tick(self) -> None:
        now = self.clock()
        self._make_firings(now)
        self._fail_stale_claims(now)
        for firing_id, spec in self._waiting():
            try:
                self._decide(firing_id, spec, now)
            except SquallError as exc:
                self._end(firing_id, FiringState.FAILED, str(exc))

    # ---- firings from moments

    def _make_firings(self, now: datetime) -> None:
        with self.store.session() as s:
            due = s.scalars(
                select(Schedule.id).where(Schedule.paused.is_(False), Schedule.next_at <= now)
            ).all()
        for schedule_id in due:
            with contextlib.suppress(IntegrityError):  # another scheduler did it first
                self._fire(schedule_id, now)

    def _fire(self, schedule_id: int, now: datetime) -> None:
        with self.store.session() as s:
            row = s.get_one(Schedule, schedule_id)
            if row.paused or row.next_at > now:
                return
            moments, more = _passed(row.cron, row.next_at, now)
            window = timedelta(seconds=row.window_s)
            latest = moments[-1]
            for moment in moments[:-1]:
                s.add(
                    Firing(
                        schedule_id=row.id,
                        due_at=moment,
                        state=FiringState.MISSED,
                        reason="no scheduler ran at this moment; of the moments missed, only "
                        "the latest may still start",
                    )
                )
            late = now - latest
            if late <= (window or GRACE):
                s.add(Firing(schedule_id=row.id, due_at=latest, reason="due"))
            else:
                s.add(
                    Firing(
                        schedule_id=row.id,
                        due_at=latest,
                        state=FiringState.MISSED,
                        reason=f"no scheduler ran at this moment, and its window ended at "
                        f"{latest + (window or GRACE):%Y-%m-%d %H:%M} UTC"
                        + (f" ({more} earlier moments missed too)" if more else ""),
                    )
                )
            # conditional: a scheduler that read the same next_at loses here, or at the
            # unique (schedule, moment) of the firings above
            moved = s.execute(
                update(Schedule)
                .where(Schedule.id == row.id, Schedule.next_at == row.next_at)
                .values(next_at=next(parse_cron(row.cron, now)))
                .execution_options(synchronize_session=False)
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                raise IntegrityError("next_at moved", None, Exception())

    def _fail_stale_claims(self, now: datetime) -> None:
        """A firing STARTED whose run never got recorded: its scheduler died in between."""
        with self.store.session() as s:
            for firing in s.scalars(
                select(Firing).where(
                    Firing.state == FiringState.STARTED,
                    Firing.start_at.between(now - timedelta(days=1), now - _STALE_CLAIM),
                    ~exists().where(Run.name == Firing.run_name),
                )
            ):
                firing.state = FiringState.FAILED
                firing.reason += "; the scheduler stopped before its run was recorded"

    # ---- waiting firings

    def _waiting(self) -> Iterator[tuple[int, ScheduleSpec]]:
        with self.store.session() as s:
            rows = s.execute(
                select(Firing.id, Schedule)
                .join(Schedule, Schedule.id == Firing.schedule_id)
                .where(Firing.state == FiringState.WAITING)
                .order_by(Firing.due_at)
            ).all()
            found = [(firing_id, ScheduleSpec.of(row)) for firing_id, row in rows]
        yield from found

    def _decide(self, firing_id: int, spec: ScheduleSpec, now: datetime) -> None:
        with self.store.session() as s:
            due = s.get_one(Firing, firing_id).due_at
        end = due + (spec.window or GRACE)
        over = now >= end
        live = self._live_run(spec.name, now)
        if live:
            if over:
                self._end(
                    firing_id,
                    FiringState.SKIPPED,
                    f"the previous run {live} was still live when its window ended "
                    "(a schedule runs one firing at a time)",
                )
            else:
                self._note(firing_id, f"waiting for the previous run {live} to end")
            return
        quotes = [self.pricer(spec, now)]
        if spec.window and not over:
            step = (end - now) / STEPS
            quotes += [self.pricer(spec, now + step * k) for k in range(1, STEPS + 1)]
        feasible = [q for q in quotes if q.site is not None and q.usd is not None]
        if not feasible:
            self._end(firing_id, FiringState.FAILED, f"no site can run it: {quotes[0].why}")
            return
        current = quotes[0]
        best = min(feasible, key=lambda q: (q.usd, q.at))
        compared = _compared(quotes, best)
        if (
            not over
            and best.at > now
            and (current.usd is None or (best.usd or 0.0) < current.usd * (1 - CHEAPER))
        ):
            why = f"waiting for {best.at:%Y-%m-%d %H:%M} UTC, the cheapest moment: {compared}"
            self._plan(firing_id, best, why)
            return
        if current.site is None or current.usd is None:
            self._end(firing_id, FiringState.FAILED, f"no site can run it now: {current.why}")
            return
        if len(quotes) > 1:
            how = f"the cheapest moment in its window ({compared})"
        else:
            how = "its window ended" if spec.window else "it has no window"
        why = (
            f"started at {now:%Y-%m-%d %H:%M} UTC on {current.site} for an estimated "
            f"{usd(current.usd)}: {how}"
        )
        self._start(firing_id, spec, due, current, why, now)

    def _live_run(self, schedule: str, now: datetime) -> str:
        """The schedule's previous run when it has not ended (its name and state), or a
        firing another scheduler claimed a moment ago whose run is not recorded yet; ""."""
        with self.store.session() as s:
            claimed = s.scalars(
                select(Firing.run_name)
                .join(Schedule, Schedule.id == Firing.schedule_id)
                .where(
                    Schedule.name == schedule,
                    Firing.state == FiringState.STARTED,
                    Firing.start_at > now - _STALE_CLAIM,
                    ~exists().where(Run.name == Firing.run_name),
                )
                .limit(1)
            ).first()
            if claimed is not None:
                return f"{claimed} (being submitted)"
            row = s.execute(
                select(Run.name, Run.state)
                .join(Firing, Firing.run_name == Run.name)
                .join(Schedule, Schedule.id == Firing.schedule_id)
                .where(Schedule.name == schedule, Run.state.not_in(RUN_ENDED))
                .order_by(Run.created_at.desc())
                .limit(1)
            ).first()
        return f"{row.name} ({row.state.value})" if row else ""

    def _start(
        self,
        firing_id: int,
        spec: ScheduleSpec,
        due: datetime,
        quote: Quote,
        why: str,
        now: datetime,
    ) -> None:
        run_name = f"{spec.name}-{due:%Y%m%d-%H%M}"
        if is_disabled(self.store, spec.owner):  # its runs would be a disabled user's
            self._end(firing_id, FiringState.FAILED, f"its owner {spec.owner} is disabled")
            return
        with self.store.session() as s:
            claimed = s.execute(
                update(Firing)
                .where(Firing.id == firing_id, Firing.state == FiringState.WAITING)
                .values(
                    state=FiringState.STARTED,
                    start_at=now,
                    site=quote.site or "",
                    estimate_usd=quote.usd,
                    run_name=run_name,
                    reason=why,
                )
                .execution_options(synchronize_session=False)
            )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return  # another scheduler took it
        log.info("%s: starting %s: %s", spec.name, run_name, why)
        try:
            self.starter(run_name, spec)
        except SquallError as exc:
            self._end(
                firing_id,
                FiringState.FAILED,
                f"{why}; but it could not start: {exc}",
                any_state=True,
            )

    def _plan(self, firing_id: int, best: Quote, why: str) -> None:
        with self.store.session() as s:
            f = s.get_one(Firing, firing_id)
            if f.state is FiringState.WAITING:
                f.start_at, f.site, f.estimate_usd, f.reason = (
                    best.at,
                    best.site or "",
                    best.usd,
                    why,
                )

    def _note(self, firing_id: int, why: str) -> None:
        with self.store.session() as s:
            f = s.get_one(Firing, firing_id)
            if f.state is FiringState.WAITING:
                f.reason = why

    def _end(
        self, firing_id: int, state: FiringState, why: str, *, any_state: bool = False
    ) -> None:
        with self.store.session() as s:
            f = s.get_one(Firing, firing_id)
            if any_state or f.state is FiringState.WAITING:
                f.state, f.reason = state, why


def _passed(cron: str, first: datetime, now: datetime) -> tuple[list[datetime], int]:
    """The cron moments from `first` (itself one) up to `now`: the last MAX_MISSED of them,
    and how many earlier ones there were besides."""
    moments = [first]
    more = 0
    sim = parse_cron(cron, first)
    for moment in sim:
        if moment > now:
            break
        moments.append(moment)
        if len(moments) > MAX_MISSED:
            moments.pop(0)
            more += 1
    return moments, more


def _compared(quotes: list[Quote], best: Quote) -> str:
    """`now $0.52 on aws:us-east-1, at 02:00 $0.21 on aws:us-east-1 (13 moments priced)`."""
    now = quotes[0]
    here = f"now {usd(now.usd or 0)} on {now.site}" if now.site else f"now none ({now.why})"
    if best is now:
        return f"{here} ({len(quotes)} moments priced)"
    then = f"at {best.at:%H:%M} {usd(best.usd or 0)} on {best.site}"
    return f"{here}, {then} ({len(quotes)} moments priced)"


# ---- pricing with federation -----------------------------------------------------------------


def local_queue(store: Store) -> dict[str, tuple[datetime, str]]:
    """This machine as busy until the runs that hold it are expected to end (their start
    plus their estimated hours); empty when none does."""
    with store.session() as s:
        rows = s.execute(
            select(Run.name, Run.held_from, Run.placement).where(
                Run.site == "local", Run.held_from.is_not(None), Run.state.not_in(RUN_ENDED)
            )
        ).all()
    ends = []
    for name, held_from, placement in rows:
        hours = ((placement or {}).get("estimate") or {}).get("hours") or 0.0
        ends.append((held_from + timedelta(hours=float(hours)), name))
    if not ends:
        return {}
    until, name = max(ends)
    return {"local": (until, f"{name} is expected to end then")}


def placer_pricer(placer: Placer, store: Store, spot: SpotHistory | None = None) -> Pricer:
    """Quotes from federation: `placer` prices the schedule's workflow under its budget and
    policy, with the outlook at the moment asked (spot history, this machine's queue)."""

    looked: dict[tuple[str, str | None], RemoteFacts] = {}
    fresh = [time.monotonic()]

    def price(spec: ScheduleSpec, at: datetime) -> Quote:
        if time.monotonic() - fresh[0] > LOOKED_FOR:  # sources asked again now and then
            looked.clear()
            fresh[0] = time.monotonic()
        workflow = load_text(spec.fuzzfile, spec.name).unwrap()
        outlook = Outlook(spot=spot or SpotHistory(), busy=local_queue(store))
        comparison = replace(placer, outlook=outlook, looked=looked).compare(
            workflow,
            spec.name,
            budget_usd=spec.budget_usd,
            policy=spec.policy,
            at=at,
            owner=spec.owner,
        )
        chosen = comparison.chosen
        if chosen is None:
            return Quote(at, None, None, comparison.refusals())
        return Quote(at, chosen.site.name, chosen.total_usd)

    return price
