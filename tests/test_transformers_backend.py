"""The transformers backend on a tiny random llama (builder.tinyhf), CPU, no network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.runtime.base import (
    Backend,
    ChatMessage,
    ContextLengthError,
    GenerationChunk,
    RuntimeSettings,
    SamplingParams,
)
from appliance.runtime.loader import load_backend
from builder.tinyhf import write_tiny_llama_hf
from signing.errors import ModelError

_EXTRA = "the transformers backend needs torch and transformers: pip install '.[transformers]'"
torch = pytest.importorskip("torch", reason=_EXTRA)
pytest.importorskip("transformers", reason=_EXTRA)
from appliance.runtime import transformers_backend  # noqa: E402 - needs torch and transformers

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox"


def settings(path: Path, **changes: Any) -> RuntimeSettings:
    # One thread: the model is tiny, and on a busy CI host more threads only wait on each other.
    return RuntimeSettings(
        backend="transformers", model_path=path, model_id="tiny-hf", threads=1, **changes
    )


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-hf") / "model"
    write_tiny_llama_hf(out)
    return out


@pytest.fixture(scope="module")
def backend(tiny_hf: Path) -> Iterator[Backend]:
    loaded = load_backend(settings(tiny_hf))
    yield loaded
    loaded.close()


def run(backend: Backend, prompt: str = PROMPT, **params: Any) -> list[GenerationChunk]:
    return list(backend.generate(prompt, SamplingParams(**params)).chunks)


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


def test_tiny_model_is_small_and_deterministic(tiny_hf: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_tiny_llama_hf(again)
    names = sorted(p.name for p in tiny_hf.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        names
    )
    for name in names:
        assert (tiny_hf / name).read_bytes() == (again / name).read_bytes(), name
    assert sum((tiny_hf / name).stat().st_size for name in names) < 5 * 1024 * 1024
    config = json.loads((tiny_hf / "tokenizer_config.json").read_text())
    assert "chat_template" in config


def test_generation_stops_at_max_tokens_with_length(backend: Backend) -> None:
    chunks = run(backend, max_tokens=12, temperature=0.0)
    assert text_of(chunks)
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 12
    assert all(chunk.finish_reason is None for chunk in chunks[:-1])
    counts = [chunk.completion_tokens for chunk in chunks]
    assert counts == sorted(counts)


def test_generation_stops_at_eos_with_stop(tiny_hf: Path, tmp_path: Path) -> None:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf, local_files_only=True)
    ids = tokenizer(PROMPT)["input_ids"]
    greedy: list[int] = []
    for _ in range(3):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids + greedy])).logits
        greedy.append(int(logits[0, -1].argmax()))
    # A copy of the model whose generation config names its third greedy token as EOS.
    eos = tmp_path / "eos"
    shutil.copytree(tiny_hf, eos)
    config = json.loads((eos / "generation_config.json").read_text())
    config["eos_token_id"] = greedy[-1]
    (eos / "generation_config.json").write_text(json.dumps(config))
    loaded = load_backend(settings(eos))
    try:
        chunks = run(loaded, max_tokens=20, temperature=0.0)
    finally:
        loaded.close()
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens == greedy.index(greedy[-1]) + 1


def test_prompt_tokens_are_counted(backend: Backend) -> None:
    generation = backend.generate(PROMPT, SamplingParams(max_tokens=1))
    assert generation.prompt_tokens == backend.count_tokens(PROMPT)
    assert generation.prompt_tokens > 1  # BOS and the text
    list(generation.chunks)


def test_greedy_and_seeded_sampling_are_reproducible(backend: Backend) -> None:
    assert run(backend, max_tokens=20, temperature=0.0) == run(
        backend, max_tokens=20, temperature=0.0
    )
    seeded = run(backend, max_tokens=20, temperature=0.9, seed=7)
    assert seeded == run(backend, max_tokens=20, temperature=0.9, seed=7)
    assert text_of(seeded) != text_of(run(backend, max_tokens=20, temperature=0.9, seed=8))


def test_concurrent_generations_match_sequential_ones(backend: Backend) -> None:
    seeds = [1, 2, 3, 4]
    expected = {seed: run(backend, max_tokens=16, temperature=1.0, seed=seed) for seed in seeds}
    results: dict[int, list[GenerationChunk]] = {}

    def worker(seed: int) -> None:
        results[seed] = run(backend, max_tokens=16, temperature=1.0, seed=seed)
        backend.count_tokens("tokenizing beside a generation")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == expected


def test_stop_string_truncates_and_finishes_with_stop(backend: Backend) -> None:
    params: dict[str, Any] = {"max_tokens": 60, "temperature": 1.0, "seed": 0}
    full = text_of(run(backend, **params))
    # A stop string from the middle of what this seed generates.
    start = next(i for i in range(3, len(full) - 3) if full[i : i + 3].isalnum())
    stop = full[start : start + 3]
    chunks = run(backend, stop=(stop,), **params)
    assert text_of(chunks) == full[: full.find(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens < 60
    assert stop not in text_of(chunks)


def test_stop_string_split_across_chunks_is_held_back(backend: Backend) -> None:
    params: dict[str, Any] = {"max_tokens": 60, "temperature": 1.0, "seed": 0}
    chunks = run(backend, **params)
    assert len(chunks) > 2
    # The end of the first chunk and the start of the second: never seen whole in one chunk.
    stop = chunks[0].text[-2:] + chunks[1].text[:2]
    full = text_of(chunks)
    stopped = run(backend, stop=(stop, "never generated"), **params)
    assert text_of(stopped) == full[: full.find(stop)]
    assert stopped[-1].finish_reason == "stop"


def test_cancel_stops_within_a_couple_of_tokens(backend: Backend) -> None:
    forward_calls = 0

    def count(*_: object) -> None:
        nonlocal forward_calls
        forward_calls += 1

    model = backend._model  # white box: count the decoding steps
    hook = model.register_forward_hook(count)
    try:
        generation = backend.generate(PROMPT, SamplingParams(max_tokens=400, seed=0))
        first = next(generation.chunks)
        generation.cancel.set()
        at_cancel = forward_calls
        rest = list(generation.chunks)
    finally:
        hook.remove()
    assert first.finish_reason is None
    assert rest == []  # a cancelled generation ends without a last chunk
    assert forward_calls - at_cancel <= 2
    assert forward_calls < 100


def test_context_length_error_before_any_work(backend: Backend) -> None:
    context = backend.context_size
    assert context == 512  # max_position_embeddings of the tiny model
    with pytest.raises(ContextLengthError) as raised:
        backend.generate("fox " * context, SamplingParams(max_tokens=1))
    assert raised.value.context == context
    prompt_tokens = backend.count_tokens(PROMPT)
    with pytest.raises(ContextLengthError):
        backend.generate(PROMPT, SamplingParams(max_tokens=context - prompt_tokens + 1))


def test_context_size_setting_overrides_the_config(tiny_hf: Path) -> None:
    small = load_backend(settings(tiny_hf, context_size=32))
    try:
        assert small.context_size == 32
        with pytest.raises(ContextLengthError):
            small.generate(PROMPT, SamplingParams(max_tokens=32))
        chunks = run(small, temperature=0.0)  # max_tokens None: up to the end of the context
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].completion_tokens == 32 - small.count_tokens(PROMPT)
    finally:
        small.close()


def test_chat_uses_the_models_template(backend: Backend) -> None:
    messages = [ChatMessage("system", "be brief"), ChatMessage("user", "hi")]
    prompt = backend.format_chat(messages)
    assert prompt == "<|system|>\nbe brief</s>\n<|user|>\nhi</s>\n<|assistant|>\n"
    assert run(backend, prompt, max_tokens=4, temperature=0.0)[-1].finish_reason == "length"


def test_chat_falls_back_when_the_model_has_no_template(tiny_hf: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_hf, bare)
    config_path = bare / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    loaded = load_backend(settings(bare))
    try:
        prompt = loaded.format_chat([ChatMessage("user", "hi")])
    finally:
        loaded.close()
    # The template llama.cpp falls back to as well, ending in a newline after the role.
    assert prompt == "<|user|>\nhi\n<|assistant|>\n"


def test_embeddings_are_normalised_and_distinct(backend: Backend) -> None:
    assert backend.supports_embeddings
    texts = ["hello", "a longer text about air gaps", "", "hello"]
    vectors = backend.embed(texts)
    assert len(vectors) == len(texts)
    assert {len(vector) for vector in vectors} == {64}
    for vector in vectors:
        assert sum(x * x for x in vector) == pytest.approx(1.0, abs=1e-5)
    assert vectors[0] == pytest.approx(vectors[3], abs=1e-5)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    # Padding in a batch does not change a text's vector.
    assert backend.embed(["hello"])[0] == pytest.approx(vectors[0], abs=1e-5)


def test_presence_and_frequency_penalties(backend: Backend) -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    processor = transformers_backend._PenaltyProcessor(2, params)
    ids = torch.tensor([[5, 7, 3, 3, 4]])  # prompt 5 7, completion 3 3 4
    scores = processor(ids, torch.zeros(1, 10))
    assert scores[0, 3].item() == pytest.approx(-(0.5 + 2 * 0.25))
    assert scores[0, 4].item() == pytest.approx(-(0.5 + 0.25))
    assert scores[0, 5].item() == 0.0  # prompt tokens are not penalised
    assert scores[0, 7].item() == 0.0
    # Wired into generation: greedy decoding repeats tokens, and the penalties change that.
    plain = run(backend, max_tokens=40, temperature=0.0)
    penalised = run(
        backend, max_tokens=40, temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0
    )
    assert text_of(penalised) != text_of(plain)


def test_stop_prefix_length() -> None:
    length = transformers_backend._stop_prefix_length
    assert length("abc", ("cde",)) == 1
    assert length("abcd", ("cde", "bcdx")) == 3
    assert length("abc", ("xyz",)) == 0
    assert length("abc", ()) == 0


def test_closed_backend_refuses_to_generate(tiny_hf: Path) -> None:
    loaded = load_backend(settings(tiny_hf))
    loaded.close()
    generation = loaded.generate(PROMPT, SamplingParams(max_tokens=2))
    with pytest.raises(ModelError, match="closed"):
        list(generation.chunks)


def assert_one_line_model_error(path: Path, match: str, **changes: Any) -> None:
    with pytest.raises(ModelError, match=match) as raised:
        load_backend(settings(path, **changes))
    assert "\n" not in str(raised.value)
    assert str(path) in str(raised.value) or "dtype" in str(raised.value)


def test_missing_model_directory(tmp_path: Path) -> None:
    assert_one_line_model_error(tmp_path / "absent", "not a model directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_model_error(empty, "no config.json")


def truncate_weights(model: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def pickle_weights(model: Path) -> None:
    from safetensors.torch import load_file

    weights = model / "model.safetensors"
    torch.save(load_file(weights), model / "pytorch_model.bin")
    weights.unlink()


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (truncate_weights, "SafetensorError"),
        (lambda model: (model / "config.json").write_text("{not json"), "config"),
        (lambda model: (model / "tokenizer.json").unlink(), "tokenizer"),
        # Pickled weights can run code when loaded: only safetensors are accepted.
        (pickle_weights, "model.safetensors"),
    ],
    ids=["truncated-weights", "bad-config", "no-tokenizer", "pickled-weights"],
)
def test_damaged_model_directory(
    tiny_hf: Path, tmp_path: Path, damage: Callable[[Path], object], match: str
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf, broken)
    damage(broken)
    assert_one_line_model_error(broken, match)


def test_unknown_dtype(tiny_hf: Path) -> None:
    assert_one_line_model_error(tiny_hf, "unknown dtype", dtype="float8")


@pytest.mark.slow
def test_loads_and_generates_with_no_network(tiny_hf: Path) -> None:
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("unshare -n is not permitted here: cannot run without a network namespace")
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from appliance.runtime.base import RuntimeSettings, SamplingParams
        from appliance.runtime.loader import load_backend
        backend = load_backend(RuntimeSettings(
            backend="transformers", model_path=Path({str(tiny_hf)!r}), model_id="tiny-hf",
            threads=1,
        ))
        chunks = list(backend.generate("Hello", SamplingParams(max_tokens=4, seed=0)).chunks)
        assert chunks[-1].finish_reason == "length", chunks
        print("generated", chunks[-1].completion_tokens)
        """
    )
    # Nothing that tells the hub to stay offline: the backend must do that itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "generated 4" in result.stdout
