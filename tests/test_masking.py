"""PII masking: the entity table (valid and checksum-invalid), and the fail-closed path.

The masker is the real one (Presidio's recognisers, offline); the failure is real too:
Presidio's own regex time limit (its ``REGEX_TIMEOUT_SECONDS``) set to nothing, so every
pattern times out inside Presidio, which skips it with a warning (fail-open) and we refuse.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from server_helpers import MODEL_ID, chat_messages, live_server, load_model, requires_llama
from server_helpers import write_model as write_tiny

from appliance.server.holder import ModelHolder
from appliance.server.masking import Masker, MaskingFailedError, iso7064_mod11_2

pytest.importorskip("presidio_analyzer")


@pytest.fixture(scope="module")
def masker() -> Masker:
    return Masker()


# (text, what the masker must make of it)
ENTITIES = [
    # payment cards: Luhn-valid masked, one digit off kept
    ("card 4111 1111 1111 1111 ok", "card <CREDIT_CARD> ok"),
    ("card 5500-0000-0000-0004 ok", "card <CREDIT_CARD> ok"),
    ("card 4111 1111 1111 1112 ok", "card 4111 1111 1111 1112 ok"),
    # IBAN: mod-97 valid masked, a wrong check digit kept
    ("iban DE89 3704 0044 0532 0130 00.", "iban <IBAN_CODE>."),
    ("iban GB82WEST12345698765432.", "iban <IBAN_CODE>."),
    ("iban DE89 3704 0044 0532 0130 01.", "iban DE89 3704 0044 0532 0130 01."),
    # e-mail (the domain checked against the offline public suffix list)
    ("mail jane.doe@example.org now", "mail <EMAIL_ADDRESS> now"),
    ("mail jane.doe@localhost now", "mail jane.doe@localhost now"),
    # phone numbers (libphonenumber validity)
    ("call +1 415 555 2671 today", "call <PHONE_NUMBER> today"),
    ("call +44 20 7946 0958 today", "call <PHONE_NUMBER> today"),
    # US SSN, and one in a range never issued (000 area)
    ("ssn 536-22-1234.", "ssn <US_SSN>."),
    ("ssn 000-22-1234.", "ssn 000-22-1234."),
    # Chinese resident ID: ISO 7064 MOD 11-2 valid masked (X as check character too)
    ("id 11010519491231002X end", "id <CN_RESIDENT_ID> end"),
    ("id 440524188001010014 end", "id <CN_RESIDENT_ID> end"),
    ("id 110105194912310021 end", "id 110105194912310021 end"),
    # nothing to mask
    ("order 12345 shipped", "order 12345 shipped"),
]


@pytest.mark.parametrize(("text", "masked"), ENTITIES)
def test_entity_table(masker: Masker, text: str, masked: str) -> None:
    assert masker.mask(text) == masked


def test_iso7064_checksum() -> None:
    assert iso7064_mod11_2("11010519491231002X")
    assert iso7064_mod11_2("11010519491231002x")
    assert not iso7064_mod11_2("110105194912310021")
    assert not iso7064_mod11_2("1101051949123100")


def test_messages_are_masked_field_by_field(masker: Masker) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,4111111111111111"}}
    call = {"id": "c1", "function": {"name": "mail", "arguments": '{"to": "jane@example.org"}'}}
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "I am jane@example.org"}, image]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "user", "content": "x", "images": ["4111111111111111"]},
    ]
    masked_call = {**call, "function": {"name": "mail", "arguments": '{"to": "<EMAIL_ADDRESS>"}'}}
    assert masker.mask_value(messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "I am <EMAIL_ADDRESS>"}, image]},
        {"role": "assistant", "content": None, "tool_calls": [masked_call]},
        {"role": "user", "content": "x", "images": ["4111111111111111"]},
    ]
    payload = {"model": "m", "prompt": "call +1 415 555 2671", "temperature": 0.5}
    masker.mask_payload(payload)
    assert payload == {"model": "m", "prompt": "call <PHONE_NUMBER>", "temperature": 0.5}


@pytest.fixture
def presidio_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Presidio's regex time limit at zero: every pattern times out inside Presidio."""
    import presidio_analyzer.pattern_recognizer as presidio_patterns

    monkeypatch.setattr(presidio_patterns, "REGEX_TIMEOUT_SECONDS", 0)


@pytest.mark.usefixtures("presidio_times_out")
def test_a_failing_masker_raises_instead_of_passing_text(masker: Masker) -> None:
    with pytest.raises(MaskingFailedError, match="refused"):
        masker.mask("mail jane@example.org")


@pytest.fixture(scope="module")
def holder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelHolder]:
    base = tmp_path_factory.mktemp("masking")
    held = ModelHolder(load_model(write_tiny(base / "tiny.gguf"), parallel=1))
    yield held
    held.close()


@requires_llama
@pytest.mark.usefixtures("presidio_times_out")
def test_serve_refuses_a_request_it_cannot_mask(tmp_path: Path, holder: ModelHolder) -> None:
    address = "jane@example.org"
    root = tmp_path / "root"
    with live_server(root, holder, max_concurrency=1, masking="both", log_prompts=True) as live:
        with pytest.raises(openai.APIStatusError) as caught:
            live.client().chat.completions.create(
                model=MODEL_ID, messages=chat_messages(f"mail {address}"), max_tokens=2
            )
        assert caught.value.status_code == 503
        error = caught.value.body
        assert isinstance(error, dict)
        assert error["code"] == "masking_failed"
        entry = live.last_entry("/v1/chat/completions")
    assert entry["status"] == 503
    assert "prompt" not in entry
    assert address not in (root / "requests.jsonl").read_text()


@requires_llama
def test_serve_masks_prompts_before_the_model(tmp_path: Path, holder: ModelHolder) -> None:
    """Policy per key: only the named key's prompts are masked before the model. The model's
    own count of prompt tokens shows what it saw: for the masked key, exactly what it counts
    for the masked text sent by a key that is not masked."""
    root = tmp_path / "root"
    per_key = {"tester": "both"}
    with live_server(
        root, holder, max_concurrency=1, masking_keys=per_key, log_prompts=True
    ) as live:
        plain_key = live.keys().add("plain")

        def prompt_tokens(prompt: str, key: str | None = None) -> int:
            answer = live.client(key=key).completions.create(
                model=MODEL_ID, prompt=prompt, max_tokens=1, temperature=0.0
            )
            assert answer.usage is not None
            return answer.usage.prompt_tokens

        raw = "card 4111 1111 1111 1111 for jane@example.org"
        masked = "card <CREDIT_CARD> for <EMAIL_ADDRESS>"
        seen_masked = prompt_tokens(raw)
        entry = live.last_entry("/v1/completions")
        assert prompt_tokens(masked, plain_key) == seen_masked
        assert prompt_tokens(raw, plain_key) != seen_masked
    assert entry["prompt"] == masked
    assert entry["status"] == 200
