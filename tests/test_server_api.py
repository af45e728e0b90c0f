"""The OpenAI-compatible API, end to end: official openai client -> uvicorn -> llama.cpp."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from server_helpers import (
    CONTEXT,
    MODEL_ID,
    TEST_KEY_NAME,
    LiveServer,
    chat_messages,
    live_server,
    load_model,
    requires_llama,
    write_model,
)

from appliance.server.holder import ModelHolder

pytestmark = requires_llama

BODY_LIMIT = 64 * 1024
GREEDY: dict[str, Any] = {"temperature": 0.0, "seed": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    base = tmp_path_factory.mktemp("api")
    holder = ModelHolder(load_model(write_model(base / "tiny.gguf")))
    with live_server(
        base / "root", holder, max_concurrency=2, max_queue=4, max_body_bytes=BODY_LIMIT
    ) as live:
        yield live
    holder.close()


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return server.client()


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict), body
    return body  # the openai client hands over the "error" object itself


# -- chat ---------------------------------------------------------------------------------------


def test_chat_completion_not_streamed(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=chat_messages(), max_tokens=8, **GREEDY
    )
    assert reply.object == "chat.completion"
    assert reply.model == MODEL_ID
    assert reply.id.startswith("chatcmpl-")
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_matches_the_whole_answer_and_ends_with_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL_ID, messages=chat_messages(), max_tokens=12, **GREEDY
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=chat_messages(),
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    *content, last = chunks
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL_ID for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in content)
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in content if c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert last.choices == []  # the usage chunk
    assert last.usage is not None
    assert whole.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID, messages=chat_messages(), max_tokens=4, stream=True, **GREEDY
        )
    )
    assert chunks
    assert all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_max_completion_tokens_bounds_the_answer(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=chat_messages(), max_completion_tokens=3, **GREEDY
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens <= 3


def test_same_seed_same_sample(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        reply = client.chat.completions.create(
            model=MODEL_ID, messages=chat_messages(), max_tokens=16, temperature=1.0, seed=seed
        )
        return reply.choices[0].message.content

    assert sample(7) == sample(7)


def test_stop_sequence_ends_the_answer_before_it(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL_ID, prompt="abc", max_tokens=24, **GREEDY)
    text = free.choices[0].text
    candidates = [text[i : i + 2] for i in range(2, len(text) - 2) if text[i : i + 2].strip()]
    if not candidates:
        pytest.skip(f"the greedy answer {text!r} has no usable stop string")
    stop = candidates[0]
    stopped = client.completions.create(
        model=MODEL_ID, prompt="abc", max_tokens=24, stop=[stop], **GREEDY
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


# -- completions --------------------------------------------------------------------------------


def test_completion_not_streamed_and_streamed_agree(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL_ID, prompt="Once", max_tokens=10, **GREEDY)
    assert whole.object == "text_completion"
    assert whole.id.startswith("cmpl-")
    assert whole.usage is not None
    assert 0 < whole.usage.completion_tokens <= 10
    chunks = list(
        client.completions.create(
            model=MODEL_ID,
            prompt="Once",
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    *content, last = chunks
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens


def test_completion_accepts_a_list_of_one_prompt(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL_ID, prompt=["Once"], max_tokens=2, **GREEDY)
    assert len(reply.choices) == 1


# -- models, embeddings -------------------------------------------------------------------------


def test_models_lists_the_served_model_only(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert models.data[0].owned_by == "airgap-appliance"
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_unknown_model_is_404_never_a_fallback(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as chat:
        client.chat.completions.create(model="gpt-4", messages=chat_messages(), max_tokens=2)
    assert error_of(chat.value)["code"] == "model_not_found"
    assert error_of(chat.value)["param"] == "model"
    with pytest.raises(openai.NotFoundError) as retrieve:
        client.models.retrieve("gpt-4")
    assert error_of(retrieve.value)["code"] == "model_not_found"


def test_embeddings_or_a_clear_400(server: LiveServer, client: openai.OpenAI) -> None:
    backend = server.holder.get()
    assert backend is not None
    if backend.supports_embeddings:
        result = client.embeddings.create(model=MODEL_ID, input=["one", "two"])
        assert [d.index for d in result.data] == [0, 1]
        assert len(result.data[0].embedding) > 0
        floats = client.embeddings.create(model=MODEL_ID, input="one", encoding_format="float")
        assert floats.data[0].embedding == pytest.approx(result.data[0].embedding, rel=1e-6)
        assert result.usage.prompt_tokens > 0
    else:
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model=MODEL_ID, input="one")
        error = error_of(caught.value)
        assert error["code"] == "embeddings_not_supported"
        assert "does not support embeddings" in error["message"]


# -- bad requests -------------------------------------------------------------------------------


def test_n_other_than_one_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=chat_messages(), n=2)
    assert error_of(caught.value)["param"] == "n"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": -1}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"frobnicate": True}, "frobnicate"),  # unknown: refused, never ignored
        ({"n": 2}, "n"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(
    server: LiveServer, extra: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL_ID, "messages": chat_messages(), "max_tokens": 2, **extra}
    with server.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


def test_missing_model_is_400(server: LiveServer) -> None:
    with server.http() as http:
        response = http.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


def test_invalid_json_is_400(server: LiveServer) -> None:
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions",
            content=b'{"model": "tiny", "messages": [',
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_prompt_beyond_the_context_is_400_context_length_exceeded(
    client: openai.OpenAI,
) -> None:
    too_long = "z" * (CONTEXT + 100)  # one token per byte in the tiny model's vocabulary
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_ID, prompt=too_long, max_tokens=2)
    assert error_of(caught.value)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as streamed:
        client.chat.completions.create(
            model=MODEL_ID,
            messages=chat_messages(too_long),
            max_tokens=2,
            stream=True,
        )
    assert error_of(streamed.value)["code"] == "context_length_exceeded"


def test_body_over_the_limit_is_413(server: LiveServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model=MODEL_ID, prompt="y" * (BODY_LIMIT + 1), max_tokens=2)
    assert caught.value.status_code == 413
    assert error_of(caught.value)["code"] == "request_too_large"
    with server.http() as http:  # chunked, no Content-Length: counted as it arrives
        response = http.post(
            "/v1/completions",
            content=iter([b'{"model": "tiny", "prompt": "', b"y" * BODY_LIMIT, b'"}']),
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 413


def test_unknown_route_is_404_in_the_openai_shape(server: LiveServer) -> None:
    with server.http() as http:
        response = http.get("/v1/engines")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


# -- health, metrics, docs, log -----------------------------------------------------------------


def test_healthz_needs_no_key(server: LiveServer) -> None:
    with server.http(key=None) as http:
        response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize("path", ["/readyz", "/metrics", "/v1/models", "/docs", "/openapi.json"])
def test_every_other_route_needs_the_key(server: LiveServer, path: str) -> None:
    with server.http(key=None) as http:
        response = http.get(path)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    with server.http() as http:
        assert http.get(path).status_code == 200


def test_readyz_names_the_model(server: LiveServer) -> None:
    with server.http() as http:
        assert http.get("/readyz").json() == {"status": "ready", "model": MODEL_ID}


def test_metrics_count_requests_tokens_and_latency(
    server: LiveServer, client: openai.OpenAI
) -> None:
    ok = 'appliance_requests_total{route="/v1/chat/completions",status="200"}'
    before = server.metrics()
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=chat_messages(), max_tokens=4, **GREEDY
    )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=chat_messages())
    after = server.metrics()
    assert reply.usage is not None
    assert after[ok] == before.get(ok, 0) + 1
    assert after["appliance_completion_tokens_total"] - before.get(
        "appliance_completion_tokens_total", 0
    ) == pytest.approx(reply.usage.completion_tokens)
    assert after["appliance_prompt_tokens_total"] > before.get("appliance_prompt_tokens_total", 0)
    ttft = "appliance_time_to_first_token_seconds_count"
    assert after[ttft] == before.get(ttft, 0) + 1
    assert after["appliance_tokens_per_second_count"] >= 1
    assert after['appliance_errors_total{type="model_not_found"}'] >= 1
    assert after["appliance_in_flight"] == 0
    assert after["appliance_queue_depth"] == 0


def test_docs_load_swagger_ui_from_the_server_itself(server: LiveServer) -> None:
    with server.http() as http:
        page = http.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        urls = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        urls += re.findall(r"url: '([^']+)'", page.text)
        assert len(urls) >= 3
        assert "://" not in page.text  # nothing from a CDN, or from anywhere else
        assert '"validatorUrl": null' in page.text
        for url in urls:
            assert url.startswith("/"), url
            asset = http.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 1000, url
        js = http.get("/docs/assets/swagger-ui-bundle.js")
        assert "SwaggerUIBundle" in js.text
        assert http.get("/docs/assets/..%2Fcore.py").status_code == 404
        schema = http.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_request_log_records_who_and_what_without_prompts(
    server: LiveServer, client: openai.OpenAI
) -> None:
    client.completions.create(model=MODEL_ID, prompt="secret prompt", max_tokens=3, **GREEDY)
    entry = server.last_entry("/v1/completions")
    assert entry["key"] == TEST_KEY_NAME
    assert entry["model"] == MODEL_ID
    assert entry["status"] == 200
    assert entry["prompt_tokens"] > 0
    assert 0 < entry["completion_tokens"] <= 3
    assert entry["latency_ms"] > 0
    assert "prompt" not in entry
    assert "secret prompt" not in server.root.joinpath("requests.jsonl").read_text()


def test_log_prompts_and_public_docs_when_asked(tmp_path: Path, server: LiveServer) -> None:
    with live_server(tmp_path / "root", server.holder, log_prompts=True, public_docs=True) as live:
        live.client().completions.create(
            model=MODEL_ID, prompt="remember me", max_tokens=2, **GREEDY
        )
        with live.http(key=None) as http:
            assert http.get("/docs").status_code == 200
            assert http.get("/openapi.json").status_code == 200
            assert http.get("/readyz").status_code == 401  # only the docs became public
        assert live.last_entry("/v1/completions")["prompt"] == "remember me"
