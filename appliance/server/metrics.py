"""Prometheus metrics, in a registry of the app's own (never the process-global one).

Two apps in one process (tests, or a swap done by building a new app) never share counters,
and nothing is registered at import time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from appliance.server.record import RequestRecord

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class ServerMetrics:
    def __init__(self, *, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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

    def observe_request(self, record: RequestRecord) -> None:
        self.requests.labels(route=record.route or "unmatched", status=str(record.status)).inc()
        if record.error is not None:
            self.errors.labels(type=record.error).inc()

    def observe_generation(self, record: RequestRecord, outcome: str) -> None:
        self.generations.labels(outcome=outcome).inc()
        self.prompt_tokens.inc(record.prompt_tokens)
        self.completion_tokens.inc(record.completion_tokens)
        if record.first_token_at is not None:
            self.time_to_first_token.observe(record.first_token_at - record.started)
        begun, ended = record.generation_started, record.generation_ended
        if begun is not None and ended is not None and ended > begun and record.completion_tokens:
            self.tokens_per_second.observe(record.completion_tokens / (ended - begun))
