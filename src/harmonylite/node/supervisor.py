"""One owner for every long-lived task of a node (DESIGN rule 13).

A task that raises is logged with its traceback and started again after a backoff that doubles
up to a cap; it is never left dead while the process runs on. A task that failed
``FAILING_AFTER`` times in a row without a healthy spell in between is reported by
:meth:`Supervisor.problems`, which turns the node's health to 503 with the reason, until it has
run for ``HEALTHY_AFTER`` seconds again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from harmonylite.aio import Backoff

log = logging.getLogger(__name__)

FAILING_AFTER = 3
HEALTHY_AFTER = 30.0
FIRST_BACKOFF = 0.2
MAX_BACKOFF = 30.0


@dataclass
class TaskState:
    name: str
    failures: int = 0  # in a row
    restarts: int = 0
    last_error: str | None = None
    started_at: float = 0.0


class Supervisor:
    def __init__(self, stop: asyncio.Event, *, first_backoff: float = FIRST_BACKOFF,
                 max_backoff: float = MAX_BACKOFF) -> None:
        self._stop = stop
        self._first = first_backoff
        self._max = max_backoff
        self.tasks: list[asyncio.Task[None]] = []
        self.states: dict[str, TaskState] = {}

    def spawn(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run ``run()`` until the stop event is set, restarting it whenever it raises."""
        state = self.states[name] = TaskState(name)
        task = asyncio.create_task(self._keep(state, run), name=name)
        self.tasks.append(task)
        return task

    async def _keep(self, state: TaskState, run: Callable[[], Awaitable[None]]) -> None:
        backoff = Backoff(self._first, self._max)
        while not self._stop.is_set():
            state.started_at = time.monotonic()
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() - state.started_at >= HEALTHY_AFTER:
                    state.failures = 0
                    backoff.reset()
                state.failures += 1
                state.restarts += 1
                state.last_error = f"{type(exc).__name__}: {exc}"
                log.error("task %s failed (%d in a row), restarting in %.1f s: %s", state.name,
                          state.failures, backoff.delay, state.last_error, exc_info=exc,
                          extra={"task": state.name})
                await backoff.wait(self._stop)
                continue
            if not self._stop.is_set():
                # A task returns only when asked to stop; returning early is a fault too.
                state.failures += 1
                state.last_error = "returned before the node stopped"
                log.error("task %s ended before the node stopped; starting it again",
                          state.name, extra={"task": state.name})
                await backoff.wait(self._stop)

    def problems(self) -> list[str]:
        """Reasons for health: tasks that keep failing."""
        now = time.monotonic()
        out = []
        for s in self.states.values():
            recovered = s.failures and now - s.started_at >= HEALTHY_AFTER
            if s.failures >= FAILING_AFTER and not recovered:
                out.append(f"task {s.name} keeps failing ({s.failures} times in a row): "
                           f"{s.last_error}")
        return out

    async def wait(self) -> None:
        """Wait for every task after the stop event (they end on their own then)."""
        for res in await asyncio.gather(*self.tasks, return_exceptions=True):
            if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
                log.error("task failed while stopping: %s", res, exc_info=res)
