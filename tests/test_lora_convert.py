"""A PEFT LoRA adapter folder to a GGUF LoRA adapter (issue 11, item 4; builder/lora.py).

Real components: the tiny HF llama (builder.tinyhf), a PEFT adapter folder for it written as
PEFT writes one (adapter_config.json and adapter_model.safetensors with PEFT's tensor names),
llama.cpp's own convert_lora_to_gguf.py from the pinned llama-cpp-python sdist in the
converter venv of the model pipeline, and llama.cpp itself (the .venv runtime, in a child
process) applying the converted adapter to the base converted by convert_hf_to_gguf.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    out = folders["root"] / "adapter.gguf"
    result = convert_lora(folders["adapter"], base=folders["hf"], out=out)
    assert result.path == out
    assert result.tensors == LAYERS * 2 * 2
    assert result.lora_alpha == ALPHA
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
