"""Pulumi stacks, one per run, driven through the Automation API, and the ledger that makes
sure none is forgotten.

The ledger (the `stacks` table) gets a row before `up` starts; only a `destroy` that
succeeded closes it. Whatever happens in between (the orchestrator killed mid-`up`, a
destroy that failed, a run that ended on another host), the row stays open, and
`squall stack gc` destroys every open stack whose run has ended or whose expiry passed.

State lives in a Pulumi backend: by default a local file backend under Squall's data
directory (no Pulumi Cloud account needed), or any backend URL given as $SQUALL_PULUMI_BACKEND.
Secrets in state (the agents' join token, inside the boot script) are encrypted with a
passphrase: $PULUMI_CONFIG_PASSPHRASE, or one made on first use and kept 0600 beside the state.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from infra.config import SPEC_KEY, spec_config
from infra.image_spec import ImageSpec
from infra.spec import ClusterSpec

from ..store import RUN_ENDED, Run, Stack, StackState, Store
from .base import ProvisionError

if TYPE_CHECKING:
    from pulumi import automation as auto

__all__ = ["INSTALL_HINT", "StackDriver", "StackSettings", "pulumi_cli"]

PROJECT = "squall"
IMAGE_PREFIX = "squall-image-"  # ImageSpec.stack_name: a published node image's stack
INSTALL_HINT = (
    "install the pulumi CLI (curl -fsSL https://get.pulumi.com | sh, or your package "
    "manager) and put it on PATH; `squall doctor` checks"
)
SDK_HINT = "install Squall's cloud extra: pip install 'squall[cloud]'"

Report = Callable[[str], None]


def pulumi_cli() -> str | None:
    """The `pulumi` on PATH, or None."""
    return shutil.which("pulumi")


@dataclass(frozen=True, slots=True)
class StackSettings:
    state_dir: Path  # the file backend and the passphrase live here unless configured
    backend_url: str | None = None  # None: file://<state_dir>/state

    @classmethod
    def from_environment(cls, data_dir: Path) -> StackSettings:
        return cls(data_dir / "stacks", os.environ.get("SQUALL_PULUMI_BACKEND") or None)

    @property
    def backend(self) -> str:
        return self.backend_url or f"file://{self.state_dir / 'state'}"

    def passphrase(self) -> str:
        if os.environ.get("PULUMI_CONFIG_PASSPHRASE"):
            return os.environ["PULUMI_CONFIG_PASSPHRASE"]
        path = self.state_dir / "passphrase"
        if not path.exists():
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        return path.read_text().strip()


class StackDriver:
    """Brings stacks up and down and keeps the ledger."""

    def __init__(self, store: Store, settings: StackSettings) -> None:
        self.store = store
        self.settings = settings
        self._cli: auto.PulumiCommand | None = None

    # ---- the Automation API -----------------------------------------------------------------

    def check(self) -> None:
        """Raise ProvisionError, in one line saying what to install, unless the Pulumi SDK
        (the `cloud` extra) and the `pulumi` CLI are both here."""
        self._command()

    def _command(self) -> auto.PulumiCommand:
        """The CLI, found once (the SDK runs `pulumi version` to check it)."""
        if self._cli is not None:
            return self._cli
        try:
            from pulumi import automation as auto
        except ImportError:
            raise ProvisionError(f"cloud sites need the Pulumi SDK: {SDK_HINT}") from None
        cli = pulumi_cli()
        if cli is None:
            raise ProvisionError(
                f"cloud sites need the pulumi CLI, which is not on PATH: {INSTALL_HINT}"
            )
        self._cli = auto.PulumiCommand(root=str(Path(cli).resolve().parent.parent))
        return self._cli

    def _stack(self, name: str, spec: ClusterSpec | None) -> auto.Stack:
        """Select the run's stack (create it when `spec` is given). The inline program holds
        the spec, join token included, in memory: it never goes on a command line."""
        from infra.program import build

        return self._select(name, (lambda: build(spec)) if spec is not None else None)

    def _select(self, name: str, declare: Callable[[], Any] | None) -> auto.Stack:
        """Select stack `name`; create it, with `declare` as its program, when one is given
        (without one, only destroy can run)."""
        from pulumi import automation as auto

        work = self.settings.state_dir / "work"
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.settings.backend_url is None:
            (self.settings.state_dir / "state").mkdir(parents=True, exist_ok=True, mode=0o700)

        def program() -> None:
            if declare is None:
                raise ProvisionError(f"{name}: only destroy runs without a spec")
            declare()

        options = auto.LocalWorkspaceOptions(
            work_dir=str(work),
            pulumi_command=self._command(),
            project_settings=auto.ProjectSettings(
                name=PROJECT,
                runtime="python",
                backend=auto.ProjectBackend(url=self.settings.backend),
            ),
            env_vars={
                "PULUMI_BACKEND_URL": self.settings.backend,
                "PULUMI_CONFIG_PASSPHRASE": self.settings.passphrase(),
                "PULUMI_SKIP_UPDATE_CHECK": "true",
            },
            secrets_provider="passphrase",
        )
        if declare is None:
            return auto.select_stack(name, PROJECT, program, opts=options)
        return auto.create_or_select_stack(name, PROJECT, program, opts=options)

    # ---- up and down ------------------------------------------------------------------------

    def up(self, spec: ClusterSpec, report: Report) -> None:
        """Record the stack and bring it up (its nodes then join the run: the stack lists
        none). On failure it is destroyed before this raises; if that fails too, the ledger
        keeps it open for `squall stack gc`."""
        self._command()  # no ledger row for a stack that could never start
        from pulumi import automation as auto

        name = spec.stack_name
        with self.store.session() as s:
            known = s.scalar(select(Stack).where(Stack.name == name))
            if known is not None and known.state is not StackState.DESTROYED:
                raise ProvisionError(f"stack {name} is already in the ledger")
            if known is not None:  # its run moved here from another site: a stack again
                s.delete(known)
                s.flush()
            s.add(
                Stack(
                    run_id=spec.run_id,
                    name=name,
                    site=f"{spec.site.cloud}:{spec.site.region}",
                    backend=self.settings.backend,
                    expires_at=spec.expires_at,
                )
            )
        try:
            stack = self._stack(name, spec)
            value, secret = spec_config(spec)[SPEC_KEY]
            stack.set_all_config({SPEC_KEY: auto.ConfigValue(value, secret=secret)})
            report(f"stack {name}: up ({spec.site.cloud}:{spec.site.region})")
            stack.up(on_output=_lines(report), color="never")
        except Exception as exc:
            raise self._failed_up(name, exc, report, "`squall stack gc`") from None
        self._set(name, StackState.UP)

    def _failed_up(
        self, name: str, exc: Exception, report: Report, retried_by: str
    ) -> ProvisionError:
        """After a failed `up`: destroy what may exist (treated as up), and the error to raise,
        saying what `retried_by` does when the destroy failed too."""
        why = _why(exc)
        self._set(name, StackState.UP, why)
        report(f"stack {name}: up failed: {why}; destroying it")
        try:
            self.destroy(name, report)
        except ProvisionError as inner:
            return ProvisionError(
                f"stack {name} failed to come up ({why}) and then to be destroyed "
                f"({inner}); {retried_by} retries"
            )
        return ProvisionError(f"stack {name} failed to come up: {why}")

    def publish(self, image: ImageSpec, report: Report) -> str:
        """Record the image's stack, bring it up, and return the machine image's id (an AMI
        id, a GCE image link, an Azure image id). Like a cluster's, a stack that fails to
        come up is destroyed; its ledger entry stays open until a destroy succeeds. An image
        stack has no run and no expiry: `squall stack gc` leaves it, `squall stack destroy
        NAME` (or `squall image unpublish`) takes it down."""
        self._command()
        from infra.images import publish

        name = image.stack_name
        with self.store.session() as s:
            row = s.scalar(select(Stack).where(Stack.name == name))
            if row is not None and row.state is not StackState.DESTROYED:
                raise ProvisionError(f"{name} is published already (squall stack list)")
            if row is not None:  # published before and destroyed: the name is free again
                s.delete(row)
                s.flush()
            s.add(Stack(run_id="", name=name, site=f"{image.cloud}:{image.region}",
                        backend=self.settings.backend, expires_at=None))  # fmt: skip
        try:
            stack = self._select(name, lambda: publish(image))
            report(f"stack {name}: up ({image.cloud}:{image.region})")
            result = stack.up(on_output=_lines(report), color="never")
            made = result.outputs["image"].value if "image" in result.outputs else None
            if not made:
                raise ProvisionError(f"stack {name} came up without an image")
        except Exception as exc:
            raise self._failed_up(name, exc, report, f"`squall stack destroy {name}`") from None
        self._set(name, StackState.UP)
        return str(made)

    def destroy(self, name: str, report: Report) -> None:
        """Destroy the stack's resources, remove the stack, and close its ledger entry."""
        self._command()  # without the SDK or the CLI: one line, and the entry stays open
        from pulumi import automation as auto

        self._set(name, StackState.DESTROYING)
        try:
            try:
                stack = self._stack(name, None)
            except auto.StackNotFoundError:
                report(f"stack {name}: not in the backend (nothing was created)")
            else:
                report(f"stack {name}: destroy")
                stack.destroy(on_output=_lines(report), color="never")
                stack.workspace.remove_stack(name)
        except Exception as exc:
            why = _why(exc)
            self._set(name, StackState.FAILED, why)
            raise ProvisionError(f"stack {name}: destroy failed: {why}") from None
        with self.store.session() as s:
            row = s.scalars(select(Stack).where(Stack.name == name)).one()
            row.state, row.destroyed_at, row.error = StackState.DESTROYED, datetime.now(UTC), ""
        report(f"stack {name}: destroyed")

    def _set(self, name: str, state: StackState, error: str = "") -> None:
        with self.store.session() as s:
            row = s.scalar(select(Stack).where(Stack.name == name))
            if row is None:
                raise ProvisionError(f"no stack named {name} in the ledger")
            row.state, row.error = state, error

    # ---- the ledger -------------------------------------------------------------------------

    def ledger(self, *, everything: bool = False) -> list[dict[str, Any]]:
        """Open entries (or all of them), oldest first, with their run's name and state."""
        with self.store.session() as s:
            query = select(Stack, Run).outerjoin(Run, Run.id == Stack.run_id).order_by(Stack.id)
            if not everything:
                query = query.where(Stack.state != StackState.DESTROYED)
            return [
                {
                    "stack": st.name,
                    "run": run.name if run else None,
                    "run_state": run.state.value if run else None,
                    "site": st.site,
                    "state": st.state.value,
                    "created_at": st.created_at.isoformat(),
                    "expires_at": st.expires_at.isoformat() if st.expires_at else None,
                    "destroyed_at": st.destroyed_at.isoformat() if st.destroyed_at else None,
                    "error": st.error,
                }
                for st, run in s.execute(query).all()
            ]

    def stale(self, now: datetime | None = None) -> list[str]:
        """Open stacks that nothing will take down: their run has ended (or is gone), or
        they are past their expiry."""
        now = now or datetime.now(UTC)
        with self.store.session() as s:
            rows = s.execute(
                select(Stack, Run)
                .outerjoin(Run, Run.id == Stack.run_id)
                .where(Stack.state != StackState.DESTROYED)
                .order_by(Stack.id)
            ).all()
            return [
                st.name
                for st, run in rows
                if not st.name.startswith(IMAGE_PREFIX)  # published images: no run, kept
                and (
                    run is None
                    or run.state in RUN_ENDED
                    or (st.expires_at is not None and st.expires_at <= now)
                )
            ]

    def name_of(self, run_or_stack: str) -> str:
        """A stack's name from itself, its run's id, or its run's name."""
        with self.store.session() as s:
            run = s.scalar(select(Run).where(Run.name == run_or_stack))
            key = run.id if run else run_or_stack
            row = s.scalar(
                select(Stack)
                .where((Stack.name == key) | (Stack.run_id == key))
                .order_by(Stack.id.desc())
            )
            if row is None:
                raise ProvisionError(f"no stack for {run_or_stack!r} in the ledger")
            return row.name


def _lines(report: Report) -> Callable[[str], None]:
    def on_output(line: str) -> None:
        if line.strip():
            report(line.strip())

    return on_output


def _why(exc: BaseException) -> str:
    """One line. A CommandError's text is the whole output of the command (code, stdout,
    stderr); the line that says what went wrong is its last `error:` line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line.split("error:", 1)[1].strip() for line in lines if "error:" in line]
    if errors:
        return errors[-1]
    return lines[-1] if lines else type(exc).__name__
