"""The Ollama API, end to end: the official ollama client -> uvicorn -> llama-server."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import ollama
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
    wait_for,
    write_model,
)

from appliance.server.holder import ModelHolder

pytestmark = requires_llama

GREEDY: dict[str, Any] = {"temperature": 0.0, "seed": 1}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(32)).decode()
FEW = {**GREEDY, "num_predict": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    base = tmp_path_factory.mktemp("ollama")
    holder = ModelHolder(load_model(write_model(base / "tiny.gguf"), parallel=2))
    with live_server(base / "root", holder, max_concurrency=2, max_queue=4) as live:
        yield live
    holder.close()


@pytest.fixture
def client(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> ollama.Client:
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    return ollama.Client(
        host=server.url, headers={"Authorization": f"Bearer {server.key}"}, timeout=60
    )


def refused(caught: pytest.ExceptionInfo[ollama.ResponseError], status: int) -> str:
    """The message of an error answered in Ollama's shape, ``{"error": "message"}``."""
    assert caught.value.status_code == status
    assert isinstance(caught.value.error, str), caught.value.error
    return caught.value.error


# -- chat ---------------------------------------------------------------------------------------


def test_chat_not_streamed(server: LiveServer, client: ollama.Client) -> None:
    reply = client.chat(model=MODEL_ID, messages=chat_messages(), options=FEW)
    assert reply.model == MODEL_ID
    assert reply.done is True
    assert reply.done_reason in ("stop", "length")
    assert reply.message.role == "assistant"
    assert isinstance(reply.message.content, str)
    assert reply.prompt_eval_count is not None and reply.prompt_eval_count > 0
    assert reply.eval_count is not None and 0 < reply.eval_count <= 4
    assert reply.total_duration is not None and reply.total_duration > 0
    entry = server.last_entry("/api/chat")
    assert entry["key"] == TEST_KEY_NAME
    assert entry["model"] == MODEL_ID
    assert entry["status"] == 200
    assert entry["stream"] is False
    assert entry["prompt_tokens"] == reply.prompt_eval_count
    assert entry["completion_tokens"] == reply.eval_count
    assert entry["finish_reason"] in ("stop", "length")


def test_chat_streamed_matches_the_whole_answer(server: LiveServer, client: ollama.Client) -> None:
    whole = client.chat(model=MODEL_ID, messages=chat_messages(), options=FEW)
    parts = list(client.chat(model=MODEL_ID, messages=chat_messages(), options=FEW, stream=True))
    *pieces, last = parts
    assert all(p.done is False for p in pieces)
    assert "".join(p.message.content or "" for p in pieces) == whole.message.content
    assert last.done is True
    assert last.done_reason == whole.done_reason
    assert last.eval_count == whole.eval_count
    assert last.prompt_eval_count == whole.prompt_eval_count
    entry = server.last_entry("/api/chat")
    assert entry["stream"] is True
    assert entry["completion_tokens"] == last.eval_count


def test_stream_is_the_default_as_in_ollama(server: LiveServer) -> None:
    body = {"model": MODEL_ID, "messages": chat_messages(), "options": FEW}
    with server.http() as http:
        response = http.post("/api/chat", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[-1]["done"] is True
    assert all(line["done"] is False for line in lines[:-1])


def test_model_with_the_latest_tag_is_the_served_model(client: ollama.Client) -> None:
    reply = client.chat(model=f"{MODEL_ID}:latest", messages=chat_messages(), options=FEW)
    assert reply.model == MODEL_ID


def test_history_with_tool_calls_and_think_are_taken(client: ollama.Client) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
    messages = [
        {"role": "user", "content": "What is 1 + 2?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
        },
        {"role": "tool", "content": "3", "tool_name": "add"},
    ]
    reply = client.chat(model=MODEL_ID, messages=messages, tools=[tool], think=False, options=FEW)
    assert reply.done is True
    for call in reply.message.tool_calls or ():
        assert isinstance(call.function.arguments, dict)


def test_empty_chat_only_loads(client: ollama.Client) -> None:
    reply = client.chat(model=MODEL_ID, messages=[])
    assert reply.done is True
    assert reply.done_reason == "load"


# -- generate -----------------------------------------------------------------------------------


def test_generate_with_system_streamed_and_not(client: ollama.Client) -> None:
    whole = client.generate(model=MODEL_ID, prompt="Hello", system="Be brief.", options=FEW)
    assert whole.done is True
    assert isinstance(whole.response, str)
    assert whole.eval_count is not None and 0 < whole.eval_count <= 4
    parts = list(
        client.generate(
            model=MODEL_ID, prompt="Hello", system="Be brief.", options=FEW, stream=True
        )
    )
    assert "".join(p.response or "" for p in parts[:-1]) == whole.response
    assert parts[-1].done is True


def test_generate_raw_goes_to_the_plain_completion(
    server: LiveServer, client: ollama.Client
) -> None:
    reply = client.generate(model=MODEL_ID, prompt="Once upon", raw=True, options=FEW)
    assert reply.done is True
    assert reply.eval_count is not None and 0 < reply.eval_count <= 4
    assert server.last_entry("/api/generate")["completion_tokens"] == reply.eval_count


def test_generate_without_a_prompt_only_loads(client: ollama.Client) -> None:
    reply = client.generate(model=MODEL_ID)
    assert reply.done_reason == "load"


# -- embeddings ---------------------------------------------------------------------------------


def test_embed_and_the_older_embeddings(server: LiveServer, client: ollama.Client) -> None:
    result = client.embed(model=MODEL_ID, input=["one", "two"])
    assert len(result.embeddings) == 2
    assert len(result.embeddings[0]) == len(result.embeddings[1]) > 0
    assert result.prompt_eval_count is not None and result.prompt_eval_count > 0
    single = client.embed(model=MODEL_ID, input="one")
    assert single.embeddings[0] == pytest.approx(result.embeddings[0], rel=1e-5)
    older = client.embeddings(model=MODEL_ID, prompt="one")
    assert older.embedding == pytest.approx(result.embeddings[0], rel=1e-5)
    assert server.last_entry("/api/embeddings")["prompt_tokens"] > 0


# -- the model ----------------------------------------------------------------------------------


def test_tags_show_ps_and_version_describe_the_served_model(
    server: LiveServer, client: ollama.Client
) -> None:
    (listed,) = client.list().models
    assert listed.model == MODEL_ID
    assert listed.size is not None and listed.size > 0
    shown = client.show(f"{MODEL_ID}:latest")
    assert shown.capabilities is not None and "completion" in shown.capabilities
    assert shown.modelinfo is not None
    (running,) = client.ps().models
    assert running.model == MODEL_ID
    assert running.context_length == CONTEXT
    with server.http() as http:  # the client has no method for it
        version = http.get("/api/version")
    assert version.status_code == 200
    assert version.json()["version"]


def test_unknown_model_is_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="llama3.2", messages=chat_messages(), options=FEW)
    assert "llama3.2" in refused(caught, 404)
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("llama3.2:latest")
    refused(caught, 404)
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model=f"{MODEL_ID}:q4", input="one")
    refused(caught, 404)


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"num_gpu": 1}, "options.num_gpu"),
        ({"tfs_z": 0.5}, "options.tfs_z"),
        ({"bogus": 1}, "options.bogus"),
        ({"num_ctx": CONTEXT + 1}, "options.num_ctx"),
    ],
)
def test_options_we_cannot_honour_are_refused_by_name(
    client: ollama.Client, options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=MODEL_ID, messages=chat_messages(), options={**FEW, **options})
    assert named in refused(caught, 400)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"bogus": True}, "bogus"),
        ({"suffix": "end"}, "suffix"),
        ({"context": [1, 2]}, "context"),
        ({"format": "xml"}, "format"),
        ({"think": "max"}, "think"),
        ({"messages": [{"role": "user", "content": "hi", "images": [PNG]}]}, "takes no images"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_fields_we_cannot_honour_are_refused_by_name(
    server: LiveServer, extra: dict[str, Any], named: str
) -> None:
    body = {"model": MODEL_ID, "messages": chat_messages(), "stream": False, **extra}
    with server.http() as http:
        response = http.post("/api/chat", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert isinstance(error, str)
    assert named in error


def test_missing_key_is_401(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    for headers in ({}, {"Authorization": "Bearer not-a-key"}):
        keyless = ollama.Client(host=server.url, headers=headers, timeout=30)
        with pytest.raises(ollama.ResponseError) as caught:
            keyless.chat(model=MODEL_ID, messages=chat_messages(), options=FEW)
        assert caught.value.status_code == 401
        with pytest.raises(ollama.ResponseError) as caught:
            keyless.list()
        assert caught.value.status_code == 401


def test_the_key_comes_from_ollama_api_key_too(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_API_KEY", server.key)
    (listed,) = ollama.Client(host=server.url, timeout=30).list().models
    assert listed.model == MODEL_ID


def test_log_prompts_records_the_messages_and_the_answers(server: LiveServer) -> None:
    root = server.root.parent / "prompts"
    with live_server(root, server.holder, log_prompts=True) as live:
        keyed = ollama.Client(host=live.url, headers={"Authorization": f"Bearer {live.key}"})
        reply = keyed.chat(model=MODEL_ID, messages=chat_messages("remember me"), options=FEW)
        entry = live.last_entry("/api/chat")
        assert entry["prompt"] == chat_messages("remember me")
        assert entry["response"] == reply.message.content  # as the OpenAI routes log it
        streamed = "".join(
            part.response
            for part in keyed.generate(model=MODEL_ID, prompt="hi", options=FEW, stream=True)
        )
        wait_for(  # the record is written once the stream has ended
            lambda: any(e["route"] == "/api/generate" for e in live.log_entries()),
            what="the streamed request's record",
        )
        assert live.last_entry("/api/generate")["response"] == streamed


# -- a real chat model: format, tools ----------------------------------------------------------


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Qwen2.5-Coder 0.5B (tests/realmodel.py): its template takes tools, and the tiny model's
    byte vocabulary makes llama.cpp refuse JSON-schema grammars (on every route)."""
    from realmodel import chat_gguf

    holder = ModelHolder(load_model(chat_gguf(), model_id="qwen", parallel=1, context=2048))
    with live_server(tmp_path_factory.mktemp("ollama-chat"), holder) as live:
        yield live
    holder.close()


def test_format_constrains_the_answer_and_show_names_tools(chat_server: LiveServer) -> None:
    client = ollama.Client(
        host=chat_server.url, headers={"Authorization": f"Bearer {chat_server.key}"}, timeout=60
    )
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    question = chat_messages("Give me a JSON object with a = 1")
    reply = client.chat(
        model="qwen",
        messages=question,
        format=schema,
        think=False,
        options={**GREEDY, "num_predict": 12},
    )
    assert json.loads(reply.message.content or "") == {"a": 1}
    streamed = client.generate(model="qwen", prompt="Hi", format="json", options=FEW, stream=True)
    assert "".join(p.response or "" for p in streamed).lstrip().startswith("{")
    shown = client.show("qwen:latest")
    assert shown.capabilities is not None
    assert "tools" in shown.capabilities
    assert "{%- if tools %}" in (shown.template or "")
