"""Runs started in this process, each driven by its engine on a thread of its own: what a
server starts through its API and what a scheduler starts on its cron."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from .engine import Engine, request_cancel
from .errors import NotFound

__all__ = ["RunThreads"]

log = logging.getLogger(__name__)


class RunThreads:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.threads: dict[str, threading.Thread] = {}
        self.lock = threading.Lock()

    def launch(
        self,
        name: str,
        text: str,
        owner: str | None = None,
        budget_usd: float | None = None,
        policy: str = "",
    ) -> str:
        """Record the run (raising what `Engine.submit` raises) and start driving it; its id."""
        run_id = self.engine.submit(name, text, owner, budget_usd, policy)
        thread = threading.Thread(
            target=self._execute, args=(run_id,), name=f"run-{name}", daemon=True
        )
        with self.lock:
            self.threads[run_id] = thread
        thread.start()
        return run_id

    def _execute(self, run_id: str) -> None:
        try:
            self.engine.execute(run_id)
        except Exception:
            log.exception("run %s stopped with an error", run_id)
        finally:
            with self.lock:
                self.threads.pop(run_id, None)

    def shutdown(self, grace: float = 60.0) -> None:
        """Cancel the runs started here and wait for their clusters to come down."""
        with self.lock:
            running = dict(self.threads)
        for run_id in running:
            with contextlib.suppress(NotFound):
                request_cancel(self.engine.store, run_id)
        deadline = time.monotonic() + grace
        for thread in running.values():
            thread.join(max(0.0, deadline - time.monotonic()))
