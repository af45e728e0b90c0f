"""Generate a tiny llama-architecture GGUF model: the project's embedded default.

It is small (well under 1 MiB by default), deterministic for a given seed, and uses a
byte-level vocabulary (SentencePiece byte tokens), so llama.cpp can load and run it with no
download of any kind. It says nothing sensible; it exists so that every path, from build to
serve, runs on a real model file on a machine with no network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from signing.errors import InputError

_SPECIAL = ["<unk>", "<s>", "</s>"]
# A minimal chat template (Jinja, as llama.cpp and transformers read it from the GGUF).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_BYTE_TOKEN_TYPE = 6
_CONTROL_TOKEN_TYPE = 3


def write_tiny_llama(
    out: Path,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    context: int = 256,
    seed: int = 0,
    chat_template: str = CHAT_TEMPLATE,
) -> None:
    """Write a llama GGUF with random weights to ``out``."""
    try:
        # Imported here: generating a model is the optional 'model' extra, not the core.
        import gguf  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415
    except ImportError:
        raise InputError(
            "generating a model needs the 'model' extra: pip install 'airgap-appliance[model]'"
        ) from None
    rng = np.random.default_rng(seed)
    tokens = [*_SPECIAL, *(f"<0x{b:02X}>" for b in range(256))]
    n_vocab = len(tokens)

    def weights(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("airgap-appliance tiny llama")
    writer.add_context_length(context)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types([_CONTROL_TOKEN_TYPE] * len(_SPECIAL) + [_BYTE_TOKEN_TYPE] * 256)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", weights(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", weights(n_vocab, n_embd))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", weights(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(n_embd, n_ff))
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_lora(
    out: Path, *, n_embd: int = 64, rank: int = 4, seed: int = 1, strength: float = 1.0
) -> None:
    """Write a GGUF LoRA adapter for :func:`write_tiny_llama`'s model (its ``output`` tensor):
    the file llama.cpp's convert_lora_to_gguf.py writes for a real fine-tune, in miniature."""
    try:
        import gguf  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415
    except ImportError:
        raise InputError(
            "generating a model needs the 'model' extra: pip install 'airgap-appliance[model]'"
        ) from None
    rng = np.random.default_rng(seed)
    n_vocab = len(_SPECIAL) + 256
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    # Numpy shapes are GGUF's reversed: A is n_embd -> rank, B is rank -> n_vocab.
    lora_a = (rng.standard_normal((rank, n_embd)) * strength).astype(np.float32)
    lora_b = (rng.standard_normal((n_vocab, rank)) * strength).astype(np.float32)
    writer.add_tensor("output.weight.lora_a", lora_a)
    writer.add_tensor("output.weight.lora_b", lora_b)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
