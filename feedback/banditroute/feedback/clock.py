"""The feedback service's time: one seam for reading the time and for every timed wait.

Windows, batch delays, grace periods, back-off and loop intervals all go
through a :class:`Clock`, so a test can hand the service a clock that moves
only when the test says so, instead of sleeping for time to pass.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """What the feedback service needs of time."""

    def now(self) -> float:
        """Wall-clock seconds (decision and reward times are wall time)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after ``seconds`` have passed on this clock."""
        ...

    async def wait(self, event: asyncio.Event, timeout_s: float | None) -> bool:
        """Wait until ``event`` is set (True) or ``timeout_s`` passed on this clock (False); None waits forever."""
        ...


class SystemClock:
    """Real time: ``time.time`` and the event loop's timers."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait(self, event: asyncio.Event, timeout_s: float | None) -> bool:
        if timeout_s is None:
            await event.wait()
            return True
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        return event.is_set()
