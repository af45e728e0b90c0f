"""Running blocking model calls on worker threads, for the async HTTP side.

A request first takes a run slot (:class:`~appliance.server.admission.Admission`), then a lease
on the current backend (:class:`~appliance.server.holder.ModelHolder`), then one worker thread
of a pool sized ``max_concurrency``. The worker calls the backend and posts what happens
(started, chunks, failure, end) to the event loop with ``call_soon_threadsafe``; the event loop
never waits on a backend call. The slot and the lease are given back by the worker when the
backend call has really ended, not when the HTTP side stops listening, so ``max_concurrency``
bounds the threads at work even while cancelled generations wind down.

Cancelling (client gone, deadline passed) sets :attr:`Generation.cancel`; the backend stops
within one token and the worker stops pulling chunks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from appliance.canary import ACTIVE, CANARY
from appliance.runtime.base import Backend, Generation, GenerationChunk
from appliance.server.admission import Admission
from appliance.server.errors import (
    ModelNotFoundError,
    NotReadyError,
    RequestTimeoutError,
    as_api_error,
)
from appliance.server.holder import Lease, ModelHolder

if TYPE_CHECKING:
    from appliance.server.canary import CanaryRoute
from appliance.server.metrics import ServerMetrics
from appliance.server.record import RequestRecord
from signing.errors import AirgapError, StateError

log = logging.getLogger(__name__)

T = TypeVar("T")
Outcome = Literal["finished", "cancelled", "timeout", "failed"]


@dataclass(frozen=True)
class _Started:
    prompt_tokens: int


@dataclass(frozen=True)
class _Failed:
    error: BaseException


@dataclass(frozen=True)
class _Ended:
    pass


_Event = _Started | GenerationChunk | _Failed | _Ended


class Engine:
    """The app's link to the model: admission, leases, worker threads, metrics."""

    def __init__(
        self,
        holder: ModelHolder,
        *,
        max_concurrency: int,
        max_queue: int,
        request_timeout_s: float,
        canary: CanaryRoute | None = None,
    ) -> None:
        self.holder = holder
        self.canary = canary  # a second slot answering some keys (appliance.canary)
        self.admission = Admission(max_concurrency=max_concurrency, max_queue=max_queue)
        self.request_timeout_s = request_timeout_s
        self.metrics = ServerMetrics(
            queue_depth=lambda: self.admission.waiting,
            in_flight=lambda: self.admission.running,
        )
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=self.admission.max_concurrency, thread_name_prefix="appliance-model"
        )

    def stop(self) -> None:
        """Take no new work. Generations still running were cancelled with their requests
        and end within a token; not waiting for them keeps the event loop free."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def model_id(self) -> str:
        backend = self.holder.get()
        if backend is None:
            raise NotReadyError("no model is loaded")
        return backend.model_id

    def model_ids(self) -> list[str]:
        """The served model ids: the active slot's, then the canary's if it has another."""
        served = [self.model_id()]
        model = self.canary.model() if self.canary is not None else None
        if model is not None and model[0] not in served:
            served.append(model[0])
        return served

    def check_model(self, requested: str) -> None:
        """404 for any model but the one served: never a silent fallback to another. With a
        canary, either slot's model id names the deployment; the key decides which answers."""
        served = self.model_ids()
        if requested not in served:
            raise ModelNotFoundError(
                f"the model {requested!r} does not exist; this server serves "
                + " and ".join(map(repr, served)),
                param="model",
            )

    def observe_canary(self, record: RequestRecord) -> None:
        """A request has been answered: the canary's actor judges those it answered."""
        if self.canary is not None:
            self.canary.observe(record)

    def deadline(self, record: RequestRecord) -> float:
        """The request's deadline on the event loop's clock, counted from its arrival."""
        loop = asyncio.get_running_loop()
        return loop.time() + self.request_timeout_s - (time.monotonic() - record.started)

    async def admit(self, record: RequestRecord, deadline: float) -> Lease:
        """A run slot and a lease on the backend, for a caller that does the work itself (the
        relay): it gives back both, ``lease.release()`` and ``admission.release()``."""
        return await self._admit(record, deadline)

    async def _admit(self, record: RequestRecord, deadline: float) -> Lease:
        try:
            async with asyncio.timeout_at(deadline):
                await self.admission.acquire()
        except TimeoutError:
            raise RequestTimeoutError(
                f"request timed out after {self.request_timeout_s:g} s waiting for a free slot"
            ) from None
        try:
            lease = self._lease(record)
        except StateError as exc:
            self.admission.release()
            raise NotReadyError(exc.diagnostics()) from None
        if (
            record.model is not None
            and record.model != lease.backend.model_id
            and record.model not in self.model_ids()
        ):
            # The model was swapped while this request waited.
            lease.release()
            self.admission.release()
            self.check_model(record.model)
        return lease

    def _lease(self, record: RequestRecord) -> Lease:
        """The one place where a request's slot is chosen: the canary's, when it answers the
        request's key (appliance.canary), else the active one's."""
        lease = self.canary.lease(record.key_name) if self.canary is not None else None
        if lease is not None:
            record.slot = CANARY
            return lease
        record.slot = ACTIVE
        return self.holder.lease()

    def _submit(self, lease: Lease, work: Callable[[], None]) -> None:
        if self._executor is None:
            lease.release()
            self.admission.release()
            raise NotReadyError("the server is not running")
        try:
            self._executor.submit(work)
        except RuntimeError:  # shut down
            lease.release()
            self.admission.release()
            raise NotReadyError("the server is shutting down") from None

    async def call(self, record: RequestRecord, fn: Callable[[Backend], T]) -> T:
        """Run a short blocking backend call (embeddings) under the same slots and limits."""
        loop = asyncio.get_running_loop()
        deadline = self.deadline(record)
        lease = await self._admit(record, deadline)
        future: asyncio.Future[T] = loop.create_future()

        def work() -> None:
            try:
                result = fn(lease.backend)
            except BaseException as exc:  # noqa: BLE001 (handed to the event loop)
                _post(loop, _settle, future, None, exc)
            else:
                _post(loop, _settle, future, result, None)
            finally:
                lease.release()
                _post(loop, self.admission.release)

        self._submit(lease, work)
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(future)
        except TimeoutError:
            raise RequestTimeoutError(
                f"request timed out after {self.request_timeout_s:g} s"
            ) from None

    async def generate(
        self, record: RequestRecord, start: Callable[[Backend], Generation]
    ) -> RunningGeneration:
        """Start a generation; returns once the backend accepted the prompt.

        Errors the backend raises before the first token (context too long) are raised here,
        so that they are answered with a proper status even for streamed requests.
        """
        loop = asyncio.get_running_loop()
        deadline = self.deadline(record)
        lease = await self._admit(record, deadline)
        running = RunningGeneration(loop, record, self.metrics, deadline)
        self._submit(lease, lambda: running.work(lease, start, self.admission))
        await running.wait_started()
        return running


class RunningGeneration:
    """One generation as seen from the event loop: an async iterator over merged chunks."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        record: RequestRecord,
        metrics: ServerMetrics,
        deadline: float,
    ) -> None:
        self._loop = loop
        self._record = record
        self._metrics = metrics
        self._deadline = deadline
        self._events: deque[_Event] = deque()
        self._wake = asyncio.Event()
        self._lock = threading.Lock()
        self._generation: Generation | None = None
        self._cancelled = False
        self._outcome: Outcome | None = None

    # -- worker thread ---------------------------------------------------------------------

    def work(
        self, lease: Lease, start: Callable[[Backend], Generation], admission: Admission
    ) -> None:
        try:
            if self._cancelled:
                return
            generation = start(lease.backend)
            self._attach(generation)
            self._emit(_Started(generation.prompt_tokens))
            for chunk in generation.chunks:
                self._emit(chunk)
                if chunk.finish_reason is not None or generation.cancel.is_set():
                    break
            close = getattr(generation.chunks, "close", None)
            if close is not None:
                close()
        except BaseException as exc:  # noqa: BLE001 (handed to the event loop)
            self._emit(_Failed(exc))
        finally:
            lease.release()
            self._emit(_Ended())
            _post(self._loop, admission.release)

    def _attach(self, generation: Generation) -> None:
        with self._lock:
            self._generation = generation
            if self._cancelled:
                generation.cancel.set()

    def _emit(self, event: _Event) -> None:
        self._events.append(event)
        _post(self._loop, self._wake.set)

    # -- event loop ------------------------------------------------------------------------

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._generation is not None:
                self._generation.cancel.set()

    async def _next(self) -> _Event:
        while not self._events:
            self._wake.clear()
            if self._events:
                break
            try:
                async with asyncio.timeout_at(self._deadline):
                    await self._wake.wait()
            except TimeoutError:
                self.cancel()
                self.finish("timeout")
                raise RequestTimeoutError("request timed out while generating") from None
        return self._events.popleft()

    async def wait_started(self) -> None:
        try:
            event = await self._next()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if isinstance(event, _Started):
            now = time.monotonic()
            self._record.prompt_tokens = event.prompt_tokens
            self._record.generation_started = now
            return
        self.finish("failed")
        raise _as_error(event)

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        """Chunks as they come; several that are already waiting come as one."""
        record = self._record
        while True:
            event = await self._next()
            if isinstance(event, _Ended):
                self.finish("finished" if record.finish_reason is not None else "cancelled")
                return
            if isinstance(event, _Failed):
                self.finish("failed")
                raise _as_error(event)
            if not isinstance(event, GenerationChunk):
                continue
            texts = [event.text]
            last = event
            while self._events and isinstance(self._events[0], GenerationChunk):
                last = self._events.popleft()  # type: ignore[assignment]
                texts.append(last.text)
            if record.first_token_at is None:
                record.first_token_at = time.monotonic()
            record.completion_tokens = last.completion_tokens
            if last.finish_reason is not None:
                record.finish_reason = last.finish_reason
            yield GenerationChunk(
                text="".join(texts),
                finish_reason=last.finish_reason,
                completion_tokens=last.completion_tokens,
            )

    def finish(self, outcome: Outcome) -> bool:
        """Account for the generation once, however it ended; False if it was already."""
        if self._outcome is not None:
            return False
        if outcome != "finished":
            self.cancel()
        self._outcome = outcome
        self._record.generation_ended = time.monotonic()
        self._metrics.observe_generation(self._record, outcome)
        return True

    async def collect(self) -> tuple[str, str]:
        """The whole text and the finish reason (not streamed)."""
        parts = [chunk.text async for chunk in self.chunks()]
        return "".join(parts), self._record.finish_reason or "stop"


def _as_error(event: _Event) -> BaseException:
    if isinstance(event, _Failed):
        if isinstance(event.error, AirgapError):
            return as_api_error(event.error)
        log.error("model call failed", exc_info=event.error)
        return event.error
    return RuntimeError(f"unexpected event {event!r}")


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        if isinstance(error, AirgapError):
            error = as_api_error(error)
        future.set_exception(error)
    else:
        future.set_result(result)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    # A closed loop raises RuntimeError: the server is gone and nobody is listening.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)
