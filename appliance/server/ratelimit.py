"""Per-key limits of the gateway: requests per minute and tokens per day.

- **Requests per minute**: a token bucket per key, holding at most ``rpm`` requests and
  refilled at ``rpm / 60`` per second. A burst of ``rpm`` requests passes, then one every
  ``60 / rpm`` seconds; a refused request is told how long until the bucket holds one again.
- **Tokens per day**: the prompt and completion tokens of the key's finished requests over the
  last 24 hours, counted in 24 hourly buckets (a rolling window, accurate to the hour). A
  request is admitted while the count is below the limit; the request that crosses it runs to
  its end (its size is not known in advance), so a key may overshoot by one request. A refused
  request is told how long until enough of the oldest buckets have expired.

Both are O(1) per request (the bucket arithmetic; at most 24 buckets to expire or to walk) and
thread-safe (one lock, held for a few arithmetic operations). The counts live in memory; at
start, ``serve`` charges them again from the request log's records of the last 24 hours
(:meth:`KeyLimiter.restore`), so a restart does not hand every key a new day's tokens
(docs/adr/0016-key-scopes-and-limits.md). The request rate starts afresh: a minute's bucket.
Time is a monotonic clock, passed in: a wrong or jumping wall clock on an isolated host changes
nothing, except which of the log's records are within the last 24 hours at a start.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final

from appliance.apikeys import KeyLimits
from appliance.server.errors import APIError

WINDOW_BUCKETS: Final = 24
BUCKET_S: Final = 3600.0
TOKEN_WINDOW_S: Final = WINDOW_BUCKETS * BUCKET_S  # tokens per day: the last 24 hours


class RateLimitExceededError(APIError):
    """429 as OpenAI answers it: ``code`` ``rate_limit_exceeded``, ``type`` naming the limit
    (``requests`` or ``tokens``), and ``Retry-After`` in whole seconds."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))

    def headers(self) -> Mapping[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class RequestRateError(RateLimitExceededError):
    type: ClassVar[str] = "requests"


class TokenQuotaError(RateLimitExceededError):
    type: ClassVar[str] = "tokens"


@dataclass
class _KeyState:
    allowance: float  # requests the bucket holds now
    refilled_at: float
    hour: int  # the hour (since the clock's origin) of the newest token bucket
    used: list[int] = field(default_factory=lambda: [0] * WINDOW_BUCKETS)
    total: int = 0  # sum of ``used``

    def expire(self, hour: int) -> None:
        """Drop the buckets older than 24 hours before ``hour``."""
        if hour <= self.hour:
            return
        for h in range(self.hour + 1, min(hour, self.hour + WINDOW_BUCKETS) + 1):
            self.total -= self.used[h % WINDOW_BUCKETS]
            self.used[h % WINDOW_BUCKETS] = 0
        self.hour = hour


class KeyLimiter:
    """The request and token counts of every key, by key name."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, _KeyState] = {}

    def admit(self, name: str, limits: KeyLimits) -> None:
        """Count one request of key ``name``; raise a :class:`RateLimitExceededError` (and
        count nothing) if a limit of ``limits`` refuses it."""
        if limits.rpm is None and limits.tokens_per_day is None:
            return
        with self._lock:
            now = self._clock()
            state = self._state(name, now)
            state.expire(self._hour(now))
            quota = limits.tokens_per_day
            if quota is not None and state.total >= quota:
                raise TokenQuotaError(
                    f"Rate limit reached for key {name!r} on tokens per day (TPD): "
                    f"Limit {quota}, Used {state.total}.",
                    retry_after_s=self._quota_frees(state, quota, now),
                )
            rpm = limits.rpm
            if rpm is None:
                return
            rate = rpm / 60.0
            state.allowance = min(float(rpm), state.allowance + (now - state.refilled_at) * rate)
            state.refilled_at = now
            if state.allowance < 1.0:
                raise RequestRateError(
                    f"Rate limit reached for key {name!r} on requests per min (RPM): Limit {rpm}.",
                    retry_after_s=(1.0 - state.allowance) / rate,
                )
            state.allowance -= 1.0

    def charge(self, name: str, tokens: int, *, age_s: float = 0.0) -> None:
        """Add the tokens of a finished request of key ``name`` to its daily count; ``age_s``:
        the request ended that many seconds ago (nothing is added at 24 hours or more)."""
        if tokens <= 0 or age_s >= TOKEN_WINDOW_S:
            return
        with self._lock:
            now = self._clock()
            state = self._state(name, now)
            state.expire(self._hour(now))
            hour = max(self._hour(now - max(age_s, 0.0)), state.hour - WINDOW_BUCKETS + 1)
            state.used[hour % WINDOW_BUCKETS] += tokens
            state.total += tokens

    def restore(self, usage: Iterable[tuple[str, float, int]]) -> int:
        """Charge each ``(key name, age in seconds, tokens)`` of requests that ended before this
        limiter began (the request log's, at a start); return how many keys were charged."""
        keys = set()
        for name, age_s, tokens in usage:
            if tokens > 0 and age_s < TOKEN_WINDOW_S:
                self.charge(name, tokens, age_s=age_s)
                keys.add(name)
        return len(keys)

    def tokens_used(self, name: str) -> int:
        """Tokens of key ``name`` over the last 24 hours."""
        with self._lock:
            state = self._keys.get(name)
            if state is None:
                return 0
            state.expire(self._hour(self._clock()))
            return state.total

    def _state(self, name: str, now: float) -> _KeyState:
        state = self._keys.get(name)
        if state is None:
            # A new key starts with a full bucket; its size is clamped to the rpm on first use.
            state = _KeyState(allowance=math.inf, refilled_at=now, hour=self._hour(now))
            self._keys[name] = state
        return state

    @staticmethod
    def _hour(now: float) -> int:
        return int(now // BUCKET_S)

    @staticmethod
    def _quota_frees(state: _KeyState, quota: int, now: float) -> float:
        """Seconds until the expiry of the oldest buckets brings the count below ``quota``."""
        remaining = state.total
        for age in range(WINDOW_BUCKETS - 1, -1, -1):  # oldest first
            hour = state.hour - age
            remaining -= state.used[hour % WINDOW_BUCKETS]
            if remaining < quota:
                return (hour + WINDOW_BUCKETS) * BUCKET_S - now
        return WINDOW_BUCKETS * BUCKET_S  # not reached: the newest bucket expires last
