"""A reasoning model's thinking comes back as ``reasoning_content``, never mixed into ``content``
(what DeepSeek's API and llama-server do, and what DeepSeek-R1-style models need).

No small reasoning model ships on PyPI (tests/realmodel.py), so the tiny generated model gets a
chat template that renders thinking the way Qwen3's and R1's do (``<think>...</think>`` before
the answer): llama.cpp's template analysis finds the markers there, as it does in theirs. A
grammar makes the model write that shape, as such a model does by itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from server_helpers import LiveServer, requires_llama, serving

from builder.tinymodel import write_tiny_llama

pytestmark = requires_llama

MODEL = "thinker"
THINKING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "<|im_start|>assistant\n"
    "{%- if message.reasoning_content -%}"
    "<think>\n{{ message.reasoning_content }}\n</think>\n\n"
    "{%- endif -%}"
    "{{ message.content }}<|im_end|>\n"
    "{%- else -%}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)
THINK_THEN_ANSWER = 'root ::= "<think>\\n" [a-z ]{3,20} "\\n</think>\\n\\n" [A-Za-z .]{1,20}'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    model = tmp_path_factory.mktemp("thinker") / "thinker.gguf"
    write_tiny_llama(model, context=1024, seed=0, chat_template=THINKING_TEMPLATE)
    root = tmp_path_factory.mktemp("root")
    with serving(root, model, model_id=MODEL, context=1024, parallel=1) as live:
        yield live


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Think first."}],
        "grammar": THINK_THEN_ANSWER,
        "max_tokens": 64,
        "temperature": 0.0,
        **extra,
    }


def _client_args(**extra: Any) -> dict[str, Any]:
    """:func:`_body` for the openai client: llama.cpp's fields go in ``extra_body``."""
    body = _body(**extra)
    grammar = body.pop("grammar")
    return {**body, "extra_body": {"grammar": grammar}}


def test_thinking_is_reasoning_content(server: LiveServer) -> None:
    reply = server.client().chat.completions.create(**_client_args())
    message = reply.choices[0].message
    thinking = (message.model_extra or {}).get("reasoning_content")
    assert thinking and "<think>" not in thinking
    assert message.content is not None
    assert "<think>" not in message.content and "</think>" not in message.content


def test_thinking_streams_as_reasoning_deltas(server: LiveServer) -> None:
    thinking, content = "", ""
    for chunk in server.client().chat.completions.create(**_client_args(stream=True)):
        for choice in chunk.choices:
            thinking += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            content += choice.delta.content or ""
    assert thinking.strip()
    assert "think>" not in content and "think>" not in thinking
    entry = server.last_entry("/v1/chat/completions")
    assert entry["completion_tokens"] > 0


def test_the_raw_form_is_there_for_clients_that_want_it(server: LiveServer) -> None:
    """llama-server's ``reasoning_format: none`` (a field we pass through) keeps the tags."""
    with server.http() as http:
        response = http.post("/v1/chat/completions", json=_body(reasoning_format="none"))
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert "<think>" in message["content"]
    assert not message.get("reasoning_content")
