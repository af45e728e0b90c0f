"""A PEFT LoRA adapter folder to a GGUF LoRA adapter (issue 11, item 4; builder/lora.py).

Real components: the tiny HF llama (builder.tinyhf), a PEFT adapter folder for it written as
PEFT writes one (adapter_config.json and adapter_model.safetensors with PEFT's tensor names),
llama.cpp's own convert_lora_to_gguf.py from the pinned llama-cpp-python sdist in the
converter venv of the model pipeline, and llama.cpp itself (the .venv runtime, in a child
process) applying the converted adapter to the base converted by convert_hf_to_gguf.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers_cli import assert_error, builder, ok
from realmodel import chat_gguf

from builder.lora import convert_lora
from signing.errors import InputError

gguf = pytest.importorskip("gguf")
pytest.importorskip("torch")

RANK, ALPHA, HIDDEN, LAYERS = 4, 8, 64, 2


def write_peft_adapter(out: Path, *, scale: float = 0.1) -> None:
    """A PEFT LoRA folder for the tiny HF llama: q_proj and v_proj of every layer."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(LAYERS):
        for proj in ("q_proj", "v_proj"):
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            a = torch.randn(RANK, HIDDEN, generator=generator) * scale
            b = torch.randn(HIDDEN, RANK, generator=generator) * scale
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny-llama",
        "bias": "none",
    }
    (out / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from builder.tinyhf import write_tiny_llama_hf

    root = tmp_path_factory.mktemp("lora")
    saved = dict(os.environ)
    try:  # tinyhf sets HF_HUB_OFFLINE for its own import of transformers: keep it from leaking
        write_tiny_llama_hf(root / "hf", tokenizer="llama", hidden=HIDDEN, layers=LAYERS)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    write_peft_adapter(root / "adapter")
    return {"root": root, "hf": root / "hf", "adapter": root / "adapter"}


@pytest.fixture(scope="module")
def converted(folders: dict[str, Path]) -> Path:
    """The adapter converted by the builder's command, which says what a recipe needs."""
    out = folders["root"] / "adapter.gguf"
    said = ok(builder("convert-lora", folders["adapter"], "--base", folders["hf"], "-o", out)).out
    assert f"GGUF LoRA adapter, {LAYERS * 2 * 2} tensors, alpha {ALPHA}" in said
    assert f"sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}" in said
    assert f'[[adapters]] path = "{out}"' in said
    return out


def _text(reader: object, key: str) -> str:
    field = reader.fields[key]  # type: ignore[attr-defined]
    return bytes(field.parts[field.data[0]]).decode()


@pytest.mark.slow
def test_a_peft_folder_becomes_a_gguf_lora_adapter(converted: Path) -> None:
    reader = gguf.GGUFReader(str(converted))
    assert _text(reader, "general.type") == "adapter"
    assert _text(reader, "adapter.type") == "lora"
    alpha = reader.fields["adapter.lora.alpha"]
    assert float(alpha.parts[alpha.data[0]][0]) == ALPHA
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    assert set(shapes) == {
        f"blk.{layer}.{proj}.weight.lora_{ab}"
        for layer in range(LAYERS)
        for proj in ("attn_q", "attn_v")
        for ab in ("a", "b")
    }
    # GGUF shapes are ggml's (innermost first): A is rank x hidden, B hidden x rank.
    assert shapes["blk.0.attn_q.weight.lora_a"] == (HIDDEN, RANK)
    assert shapes["blk.0.attn_q.weight.lora_b"] == (RANK, HIDDEN)


APPLY = """
import sys
from pathlib import Path
from appliance.runtime import cpuvariant
model, adapter = sys.argv[1], sys.argv[2]
cpuvariant.prepare(model_path=Path(model), memory=None)
import llama_cpp
def last_logits(lora):
    kw = dict(model_path=model, n_ctx=64, n_threads=1, verbose=False, logits_all=True)
    if lora:
        kw["lora_path"] = lora
    llm = llama_cpp.Llama(**kw)
    tokens = llm.tokenize(b"The quick brown fox")
    llm.eval(tokens)
    return [float(x) for x in llm.scores[len(tokens) - 1]]
plain, adapted = last_logits(None), last_logits(adapter)
print(max(abs(a - b) for a, b in zip(plain, adapted)))
"""


@pytest.mark.slow
def test_llama_cpp_applies_the_converted_adapter(folders: dict[str, Path], converted: Path) -> None:
    pytest.importorskip("llama_cpp")
    from builder.convert import convert_model

    base = convert_model(folders["hf"], quantize="F32", work=folders["root"] / "gguf").path
    result = subprocess.run(
        [sys.executable, "-c", APPLY, str(base), str(converted)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    change = float(result.stdout.split()[-1])
    assert change > 1e-3  # the adapter moves the logits: llama.cpp loaded and applied it


def test_refusals_name_the_problem(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a.gguf"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InputError, match=r"adapter_model\.bin is a pickle"):
        convert_lora(pickled, base=folders["hf"], out=out)
    for config, message in [
        ({"r": 4}, "lora_alpha None is not a positive number"),
        ({"r": 0, "lora_alpha": 8}, "r 0 is not a positive integer"),
        ({"r": 4, "lora_alpha": True}, "lora_alpha True"),
        ({"peft_type": "IA3", "r": 4, "lora_alpha": 8}, "peft_type 'IA3'"),
        ([1], "is not an object"),
    ]:
        bad = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
        bad.mkdir()
        (bad / "adapter_model.safetensors").write_bytes(b"")
        (bad / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(InputError, match=message):
            convert_lora(bad, base=folders["hf"], out=out)
    with pytest.raises(InputError, match=r"no config\.json"):
        convert_lora(folders["adapter"], base=tmp_path, out=out)
    with pytest.raises(InputError, match="unknown adapter type 'q4_0'"):
        convert_lora(folders["adapter"], base=folders["hf"], out=out, outtype="q4_0")
    out.write_bytes(b"")
    with pytest.raises(InputError, match="exists"):
        convert_lora(folders["adapter"], base=folders["hf"], out=out)
    # The command: one line and exit 2, as every input error.
    assert_error(
        builder("convert-lora", pickled, "--base", folders["hf"], "-o", tmp_path / "b.gguf"),
        2,
        "adapter_model.bin is a pickle",
    )


def write_peft_adapter_for(model: Path, out: Path, *, scale: float = 0.05) -> Path:
    """A PEFT LoRA folder for the real GGUF ``model`` (a Qwen2: q_proj and v_proj of every
    layer) and the Hugging Face base folder the converter reads: config.json alone, its numbers
    taken from the GGUF's own metadata. Returns the base folder."""
    import torch
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(model))

    def number(key: str) -> int:
        field = reader.fields[key]
        return int(field.parts[field.data[0]][0])

    arch = _text(reader, "general.architecture")
    assert arch == "qwen2", arch
    hidden, layers = number("qwen2.embedding_length"), number("qwen2.block_count")
    heads, kv_heads = number("qwen2.attention.head_count"), number("qwen2.attention.head_count_kv")
    base = out / "base"
    base.mkdir(parents=True)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": number("qwen2.feed_forward_length"),
        "max_position_embeddings": number("qwen2.context_length"),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    }
    (base / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(1)
    kv = hidden // heads * kv_heads
    tensors = {}
    for layer in range(layers):
        for proj, rows in (("q_proj", hidden), ("v_proj", kv)):
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{name}.lora_A.weight"] = (
                torch.randn(RANK, hidden, generator=generator) * scale
            )
            tensors[f"{name}.lora_B.weight"] = torch.randn(rows, RANK, generator=generator) * scale
    adapter = out / "adapter"
    adapter.mkdir()
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": RANK,
                "lora_alpha": ALPHA,
                "bias": "none",
                "target_modules": ["q_proj", "v_proj"],
                "task_type": "CAUSAL_LM",
            }
        )
    )
    return base


@pytest.mark.slow
def test_a_real_quantised_model_serves_with_a_converted_adapter(tmp_path: Path) -> None:
    """The LoRA path on what users run: a PEFT adapter for the real Qwen2.5-Coder 0.5B,
    converted by the command, applied by llama-server (``--lora``, as ``serve`` runs it) on top
    of the Q4_K_M weights' quantised kernels, answers, and answers differently."""
    pytest.importorskip("llama_cpp")
    from server_helpers import llama_settings

    from appliance.runtime.base import SamplingParams
    from appliance.runtime.loader import load_backend

    model = chat_gguf()
    base = write_peft_adapter_for(model, tmp_path)
    adapter = tmp_path / "style.gguf"
    ok(builder("convert-lora", tmp_path / "adapter", "--base", base, "-o", adapter))

    def greedy(adapters: tuple[Path, ...]) -> str:
        settings = llama_settings(model, parallel=1, context=512)
        backend = load_backend(replace(settings, adapters=adapters))
        try:
            params = SamplingParams(max_tokens=16, temperature=0.0)
            return "".join(c.text for c in backend.generate("def fibonacci(n):", params).chunks)
        finally:
            backend.close()

    plain, tuned = greedy(()), greedy((adapter,))
    assert plain.strip() and tuned.strip()
    assert tuned != plain, plain
