"""Prometheus metrics, in a registry of the app's own (never the process-global one).

Two apps in one process (tests, or a swap done by building a new app) never share counters,
and nothing is registered at import time.

Two families are exported (docs/operator-guide.md, "Monitoring", has the table):

- ``appliance_*``, the first names, unlabelled or labelled by route, status, error type and
  outcome; kept as they were, for dashboards and scripts that already read them;
- ``appliance:*``, named and typed like vLLM's ``vllm:*`` series (``appliance:X`` is what
  ``vllm:X`` is), labelled ``model_name`` (vLLM's label) and ``slot`` (the installed slot that
  served), and covering the Gateway API Inference Extension's model-server protocol:
  ``appliance:num_requests_waiting`` (TotalQueuedRequests), ``appliance:num_requests_running``
  (TotalRunningRequests) and ``appliance:kv_cache_usage_perc`` (KVCacheUtilization). The
  shipped dashboard and alert rules (appliance/monitoring/) read this family, and the GPU
  figures of :mod:`appliance.server.gpumetrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.canary import ACTIVE
from appliance.server.gpumetrics import GpuCollector
from appliance.server.record import RequestRecord

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# 0.5 s is a bound: the shipped alert on the P99 (500 ms) is then read off a bucket edge.
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)

SERVED: Final = ("model_name", "slot")
# What the app serves right now, by slot label (appliance.canary's ACTIVE and CANARY):
# {"active": backend, "canary": backend}, a slot that serves nothing left out or None. A backend
# is anything with ``model_id``; its ``settings.slot`` (a slot directory) names the slot.
Serving = Callable[[], Mapping[str, Any]]


def slot_id(backend: Any) -> str:
    """The installed slot a backend was loaded from ("" for a model from no slot)."""
    slot = getattr(getattr(backend, "settings", None), "slot", None)
    return slot.name if slot is not None else ""


class ServerMetrics:
    def __init__(
        self,
        *,
        queue_depth: Callable[[], float],
        in_flight: Callable[[], float],
        serving: Serving = dict,
        capacity: int | None = None,
        gpus: bool = True,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._serving = serving
        self._capacity = capacity
        r = self.registry
        self.requests = Counter(
            "appliance_requests",
            "HTTP requests answered, by route template and status.",
            ["route", "status"],
            registry=r,
        )
        self.errors = Counter(
            "appliance_errors", "Error responses, by error code.", ["type"], registry=r
        )
        self.prompt_tokens = Counter(
            "appliance_prompt_tokens", "Prompt tokens processed.", registry=r
        )
        self.completion_tokens = Counter(
            "appliance_completion_tokens", "Completion tokens generated.", registry=r
        )
        self.generations = Counter(
            "appliance_generations",
            "Generations ended, by outcome (finished, cancelled, timeout, failed).",
            ["outcome"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "appliance_time_to_first_token_seconds",
            "From request received (queueing included) to the first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "appliance_tokens_per_second",
            "Completion tokens per second of generation, per request.",
            buckets=_TPS_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "appliance_queue_depth", "Requests waiting for a free slot.", registry=r
        )
        self.queue_depth.set_function(queue_depth)
        self.in_flight = Gauge(
            "appliance_in_flight", "Requests holding a slot (generating or embedding).", registry=r
        )
        self.in_flight.set_function(in_flight)
        # -- the vLLM-aligned family, by model and slot ------------------------------------
        self.http_requests = Counter(
            "appliance:http_requests",
            "HTTP requests answered, by route template, status, model and slot "
            "(429: refused by a limit; 5xx: failed).",
            ["route", "status", *SERVED],
            registry=r,
        )
        self.prompt_tokens_by_slot = Counter(
            "appliance:prompt_tokens",
            "Prompt (prefill) tokens processed (vllm:prompt_tokens_total).",
            SERVED,
            registry=r,
        )
        self.generation_tokens = Counter(
            "appliance:generation_tokens",
            "Tokens generated (vllm:generation_tokens_total).",
            SERVED,
            registry=r,
        )
        self.request_outcomes = Counter(
            "appliance:request_outcome",
            "Generations ended, by outcome: finished, cancelled, timeout, failed.",
            ["outcome", *SERVED],
            registry=r,
        )
        self.ttft = Histogram(
            "appliance:time_to_first_token_seconds",
            "From request received (queueing included) to the first token "
            "(vllm:time_to_first_token_seconds).",
            SERVED,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "appliance:time_per_output_token_seconds",
            "Mean time between tokens after the first, per streamed request "
            "(vllm:time_per_output_token_seconds).",
            SERVED,
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "appliance:e2e_request_latency_seconds",
            "From request received to its generation's end, queueing included "
            "(vllm:e2e_request_latency_seconds).",
            SERVED,
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        r.register(_LoadCollector(self, queue_depth=queue_depth, in_flight=in_flight))
        self.gpus: GpuCollector | None = None
        if gpus:
            self.gpus = GpuCollector()
            r.register(self.gpus)

    def follow(self, serving: Serving, *, capacity: int) -> None:
        """Label by what ``serving()`` returns; ``capacity``: requests that may run at once."""
        self._serving = serving
        self._capacity = capacity

    def serving(self) -> Mapping[str, Any]:
        """What each slot label serves now."""
        return self._serving()

    @property
    def capacity(self) -> int | None:
        return self._capacity

    def labels_of(self, record: RequestRecord) -> tuple[str, str]:
        """``(model_name, slot)`` of a request: the slot that answered it (the active one for
        those that reached no model), and that slot's model."""
        slot = record.slot or ACTIVE
        backend = self.serving().get(slot)
        return (str(backend.model_id) if backend is not None else ""), slot

    def observe_request(self, record: RequestRecord) -> None:
        route, status = record.route or "unmatched", str(record.status)
        self.requests.labels(route=route, status=status).inc()
        if record.error is not None:
            self.errors.labels(type=record.error).inc()
        model, slot = self.labels_of(record)
        self.http_requests.labels(route=route, status=status, model_name=model, slot=slot).inc()

    def observe_generation(self, record: RequestRecord, outcome: str) -> None:
        self.generations.labels(outcome=outcome).inc()
        self.prompt_tokens.inc(record.prompt_tokens)
        self.completion_tokens.inc(record.completion_tokens)
        served = self.labels_of(record)
        self.request_outcomes.labels(outcome, *served).inc()
        self.prompt_tokens_by_slot.labels(*served).inc(record.prompt_tokens)
        self.generation_tokens.labels(*served).inc(record.completion_tokens)
        first = record.first_token_at
        if first is not None:
            self.time_to_first_token.observe(first - record.started)
            self.ttft.labels(*served).observe(first - record.started)
        begun, ended = record.generation_started, record.generation_ended
        if begun is not None and ended is not None and ended > begun and record.completion_tokens:
            self.tokens_per_second.observe(record.completion_tokens / (ended - begun))
        if ended is not None and outcome == "finished":
            self.e2e.labels(*served).observe(ended - record.started)
            # Streamed only: an answer sent whole has its "first token" when it has them all.
            if record.stream and first is not None and record.completion_tokens > 1:
                self.tpot.labels(*served).observe((ended - first) / (record.completion_tokens - 1))


class _LoadCollector(Collector):
    """Gauges read at each scrape: the GIE model-server protocol's (by the active slot's model;
    the queue and the sequences are the server's, shared by both slots), and per slot, what it
    serves and whether its engine is up."""

    def __init__(
        self,
        metrics: ServerMetrics,
        *,
        queue_depth: Callable[[], float],
        in_flight: Callable[[], float],
    ) -> None:
        self._metrics = metrics
        self._queue_depth = queue_depth
        self._in_flight = in_flight

    def describe(self) -> Iterator[Metric]:
        yield from self._families({})

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._metrics.serving())

    def _families(self, serving: Mapping[str, Any]) -> Iterator[Metric]:
        active = serving.get(ACTIVE)
        model = [str(active.model_id) if active is not None else ""]
        waiting = GaugeMetricFamily(
            "appliance:num_requests_waiting",
            "Requests queued for a free sequence (vllm:num_requests_waiting; GIE "
            "TotalQueuedRequests; llamacpp:requests_deferred).",
            labels=["model_name"],
        )
        running = GaugeMetricFamily(
            "appliance:num_requests_running",
            "Requests generating or embedding (vllm:num_requests_running; GIE "
            "TotalRunningRequests; llamacpp:requests_processing).",
            labels=["model_name"],
        )
        kv = GaugeMetricFamily(
            "appliance:kv_cache_usage_perc",
            "KV-cache usage, 1 = full (vllm:kv_cache_usage_perc; GIE KVCacheUtilization): the "
            "engine gives each parallel sequence a fixed share of its KV cache, so this is the "
            "share of sequences busy (running requests / max concurrency).",
            labels=["model_name"],
        )
        now_running = float(self._in_flight())
        waiting.add_metric(model, float(self._queue_depth()))
        running.add_metric(model, now_running)
        capacity = self._metrics.capacity
        if capacity:
            kv.add_metric(model, min(1.0, now_running / capacity))
        info = GaugeMetricFamily(
            "appliance:slot_info",
            "1 for each slot label serving: its installed slot (slot_id) and model.",
            labels=[*SERVED, "slot_id"],
        )
        ready = GaugeMetricFamily(
            "appliance:model_ready",
            "1 while the slot's model is loaded and its engine answers, else 0.",
            labels=list(SERVED),
        )
        restarts = CounterMetricFamily(
            "appliance:engine_restarts",
            "Times the llama-server engine of the slot's model died and was restarted.",
            labels=list(SERVED),
        )
        if active is None:
            ready.add_metric(["", ACTIVE], 0.0)
        for slot, backend in serving.items():
            if backend is None:
                continue
            labels = [str(backend.model_id), slot]
            info.add_metric([*labels, slot_id(backend)], 1.0)
            engine = getattr(backend, "engine", None)
            ready.add_metric(labels, 1.0 if getattr(engine, "ready", True) else 0.0)
            count = getattr(engine, "restarts", None)
            if isinstance(count, int):
                restarts.add_metric(labels, float(count))
        yield from (waiting, running, kv, info, ready, restarts)
