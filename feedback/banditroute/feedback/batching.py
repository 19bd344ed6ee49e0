"""Batching helpers of the feedback actor.

- :class:`MicroBatcher` (pure): groups joined events for the learner; a
  batch is due when it has ``batch_size`` items or its oldest item has
  waited ``max_delay_s``.
- :class:`GroupCommitter` (asyncio): many concurrent callers hand it items
  to make durable; it writes them together in one storage write (group
  commit) and resolves every caller's future when THAT write has finished.
  One write is in flight at a time; whatever arrives meanwhile goes into the
  next one, so under load the writes get bigger, not more frequent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Size + max-delay batching (the caller supplies ``now``)."""

    def __init__(self, batch_size: int, max_delay_s: float, max_batch: int | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if max_delay_s < 0:
            raise ValueError("max_delay_s must be >= 0")
        self.batch_size = batch_size
        self.max_delay_s = max_delay_s
        self.max_batch = max(batch_size, max_batch or batch_size)
        self._items: list[T] = []
        self._oldest: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    def add(self, items: Sequence[T], now: float) -> None:
        if not items:
            return
        if not self._items:
            self._oldest = now
        self._items.extend(items)

    def due_at(self) -> float | None:
        """When the current batch becomes due by age (None if empty)."""
        return None if self._oldest is None else self._oldest + self.max_delay_s

    def is_due(self, now: float) -> bool:
        return bool(self._items) and (len(self._items) >= self.batch_size or now >= (self.due_at() or now))

    def push_front(self, items: Sequence[T], now: float) -> None:
        """Put items back at the front (a failed delivery), keeping their order."""
        if not items:
            return
        self._items[:0] = list(items)
        if self._oldest is None:
            self._oldest = now

    def take(self, now: float, force: bool = False) -> list[T]:
        """The next batch (at most ``max_batch`` items) if due (or ``force``), else []."""
        if not self._items or not (force or self.is_due(now)):
            return []
        batch, self._items = self._items[: self.max_batch], self._items[self.max_batch :]
        self._oldest = now if self._items else None
        return batch


class GroupCommitter(Generic[T]):
    """Coalesce concurrent durable writes: ``await submit(items)`` returns once they are written."""

    def __init__(
        self,
        write: Callable[[list[T]], Any],
        max_wait_s: float = 0.0,
        max_items: int = 10_000,
        executor: concurrent.futures.Executor | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self._write = write
        self._sleep = sleep
        self.max_wait_s = max_wait_s
        self.max_items = max_items
        self._executor = executor
        self._queue: list[tuple[list[T], asyncio.Future]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.writes = 0
        self.items_written = 0
        self.failures = 0
        self.last_write_s = 0.0

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, items: Sequence[T]) -> Any:
        """Write ``items`` durably (together with other callers'); returns the write's result."""
        self._ensure_task()
        future = asyncio.get_running_loop().create_future()
        self._queue.append((list(items), future))
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._queue:
                continue
            if self.max_wait_s > 0 and sum(len(i) for i, _ in self._queue) < self.max_items:
                await self._sleep(self.max_wait_s)
            taken: list[tuple[list[T], asyncio.Future]] = []
            n = 0
            while self._queue and (not taken or n + len(self._queue[0][0]) <= self.max_items):
                entry = self._queue.pop(0)
                taken.append(entry)
                n += len(entry[0])
            items = [x for batch, _ in taken for x in batch]
            start = time.perf_counter()
            try:
                result = await loop.run_in_executor(self._executor, self._write, items)
            except Exception as exc:  # noqa: BLE001 - every waiter gets the error
                self.failures += 1
                for _, fut in taken:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                self.writes += 1
                self.items_written += len(items)
                for _, fut in taken:
                    if not fut.done():
                        fut.set_result(result)
            finally:
                self.last_write_s = time.perf_counter() - start
            if self._queue:
                self._wakeup.set()
