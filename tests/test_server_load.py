"""Queueing, cancellation, timeouts and model swaps, on a live server with llama.cpp."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_helpers import (
    LiveServer,
    chat_messages,
    live_server,
    load_model,
    requires_llama,
    wait_for,
    write_model,
)

from appliance.runtime.llamaserver import LlamaServerBackend
from appliance.server.holder import ModelHolder

pytestmark = requires_llama

LONG = 16000  # tokens: seconds of generation, far more than any test waits for
GREEDY: dict[str, Any] = {"temperature": 0.0, "seed": 1}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("load") / "tiny.gguf")


@pytest.fixture(scope="module")
def holder(model_path: Path) -> Iterator[ModelHolder]:
    made = ModelHolder(load_model(model_path, parallel=1))
    yield made
    made.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, holder: ModelHolder) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("load-root")
    with live_server(root, holder, max_concurrency=1, max_queue=1) as live:
        yield live


def long_stream(client: openai.OpenAI, model: str = "tiny") -> Any:
    return client.chat.completions.create(
        model=model, messages=chat_messages(), max_tokens=LONG, stream=True, **GREEDY
    )


def idle(server: LiveServer) -> bool:
    return server.metric("appliance_in_flight") == 0 and server.metric("appliance_queue_depth") == 0


def test_a_full_queue_answers_429_with_retry_after(server: LiveServer) -> None:
    client = server.client()
    running = long_stream(client)
    next(iter(running))  # generating now: the one run slot is taken
    queued: dict[str, Any] = {}

    def wait_in_queue() -> None:
        reply = client.chat.completions.create(
            model="tiny", messages=chat_messages(), max_tokens=2, **GREEDY
        )
        queued["reply"] = reply

    waiter = threading.Thread(target=wait_in_queue)
    waiter.start()
    wait_for(lambda: server.metric("appliance_queue_depth") == 1, what="a queued request")
    assert server.metric("appliance_in_flight") == 1
    refused = 0
    for _ in range(3):
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=2)
        assert caught.value.response.headers["retry-after"] == "1"
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["code"] == "queue_full"
        refused += 1
    running.close()  # frees the slot: the queued request runs
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert queued["reply"].choices[0].finish_reason in ("stop", "length")
    assert server.metric('appliance_errors_total{type="queue_full"}') == refused
    wait_for(lambda: idle(server), what="the server to be idle")


def test_many_clients_some_refused_none_lost(server: LiveServer) -> None:
    client = server.client()
    results: list[str] = []
    lock = threading.Lock()
    clients = 6
    together = threading.Barrier(clients)

    def one() -> None:
        together.wait()
        try:
            client.chat.completions.create(
                model="tiny", messages=chat_messages(), max_tokens=1000, **GREEDY
            )
            outcome = "ok"
        except openai.RateLimitError:
            outcome = "429"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == clients  # every request answered, none hung or dropped
    assert "ok" in results
    assert "429" in results
    wait_for(lambda: idle(server), what="the server to be idle")


def test_closing_a_stream_stops_generation(server: LiveServer) -> None:
    cancelled = 'appliance_generations_total{outcome="cancelled"}'
    before = server.metric(cancelled)
    stream = long_stream(server.client())
    chunks = iter(stream)
    next(chunks)
    next(chunks)
    stream.close()
    took = wait_for(
        lambda: server.metric(cancelled) == before + 1 and idle(server),
        timeout_s=2.0,
        what="the generation to stop after the client left",
    )
    assert took < 2.0
    entry = server.last_entry("/v1/chat/completions")
    assert entry["stream"] is True
    assert 0 < entry["completion_tokens"] < LONG
    assert entry["finish_reason"] is None
    assert entry["error"] == "client_closed_request"
    # ... and the engine behind the relay stopped too: it generates nothing for anyone.
    wait_for(lambda: engine_busy(server) == 0, timeout_s=2.0, what="the engine to stop")


def engine_busy(server: LiveServer) -> float:
    """Requests llama-server itself is working on (its own metrics)."""
    backend = server.holder.get()
    assert isinstance(backend, LlamaServerBackend)
    with backend.engine.client() as http:
        text = http.get("/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith("llamacpp:requests_processing"))
    return float(line.split()[-1])


def test_a_client_that_gives_up_on_a_whole_answer_stops_generation(server: LiveServer) -> None:
    cancelled = 'appliance_generations_total{outcome="cancelled"}'
    before = server.metric(cancelled)
    body = {"model": "tiny", "messages": chat_messages(), "max_tokens": LONG, **GREEDY}
    with server.http(timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body)
    wait_for(
        lambda: server.metric(cancelled) == before + 1 and idle(server),
        timeout_s=2.0,
        what="the generation to stop after the client left",
    )
    entry = server.last_entry("/v1/chat/completions")
    assert entry["status"] == 499
    assert entry["completion_tokens"] < LONG


def test_request_timeout_is_504_or_an_error_event(tmp_path: Path, holder: ModelHolder) -> None:
    with live_server(tmp_path, holder, max_concurrency=1, request_timeout_s=0.3) as live:
        client = live.client()
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(
                model="tiny", messages=chat_messages(), max_tokens=LONG, **GREEDY
            )
        assert time.monotonic() - start < 2.0
        assert caught.value.status_code == 504
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["code"] == "request_timeout"
        with pytest.raises(openai.APIError, match="timed out"):
            for _ in long_stream(client):
                pass
        wait_for(lambda: idle(live), what="the timed-out generations to stop")
        assert live.metric('appliance_generations_total{outcome="timeout"}') == 2


def test_swapping_the_model_lets_requests_in_flight_finish(
    tmp_path: Path, model_path: Path
) -> None:
    old = load_model(model_path, model_id="tiny-a", parallel=1)
    new = load_model(model_path, model_id="tiny-b", parallel=1)
    holder = ModelHolder(old)
    with live_server(tmp_path, holder, max_concurrency=2) as live:
        client = live.client()
        stream = client.chat.completions.create(
            model="tiny-a", messages=chat_messages(), max_tokens=1500, stream=True, **GREEDY
        )
        chunks = iter(stream)
        first = next(chunks)
        assert holder.swap(new) is old
        assert holder.draining == 1  # the old model still serves the stream
        rest = list(chunks)
        assert {c.model for c in [first, *rest]} == {"tiny-a"}
        assert rest[-1].choices[0].finish_reason in ("stop", "length")
        assert [m.id for m in client.models.list().data] == ["tiny-b"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="tiny-a", messages=chat_messages())
        reply = client.chat.completions.create(
            model="tiny-b", messages=chat_messages(), max_tokens=2
        )
        assert reply.model == "tiny-b"
        wait_for(lambda: holder.draining == 0, what="the old model to be closed")
    holder.close()
