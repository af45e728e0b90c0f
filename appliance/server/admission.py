"""The bounded request queue: ``max_concurrency`` requests run, ``max_queue`` wait, others: 429.

Waiters are served first come, first served: a released slot is handed straight to the oldest
waiter, so a newcomer cannot overtake the queue. Runs on the event loop thread only; worker
threads hand their release back with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from appliance.server.errors import QueueFullError

RETRY_AFTER_S = 1


class Admission:
    def __init__(self, *, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self) -> None:
        """Take a run slot, waiting in the queue if needed; raise QueueFullError if it is full."""
        if self.running < self.max_concurrency and not self._waiters:
            self.running += 1
            return
        if self.waiting >= self.max_queue:
            raise QueueFullError(
                f"server busy: {self.running} requests running and {self.waiting} waiting; "
                "retry later",
                retry_after_s=RETRY_AFTER_S,
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):  # release() may have dropped it already
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes on to the waiter; running is unchanged
                return
        self.running -= 1
