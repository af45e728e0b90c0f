"""Generate a tiny Hugging Face (transformers) llama model: the transformers backend's test model.

The directory it writes is what ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load: ``config.json``, ``generation_config.json``,
``model.safetensors`` (random weights), ``tokenizer.json``, ``tokenizer_config.json`` and the
chat template. The tokenizer is a BPE trained on a short built-in text, so every string can be
encoded, and nothing is downloaded: byte-level (GPT-2 style) by default, or with
``tokenizer="llama"`` the Llama 2 style (SentencePiece-like pieces with ``▁`` for spaces and
byte fallback to ``<0x00>``..``<0xFF>`` tokens), which llama.cpp's converter
(``convert_hf_to_gguf.py``) reads as a "llama" vocabulary; it refuses a byte-level BPE whose
pre-tokenizer is not one it knows by hash (builder.convert). The model says nothing
sensible; it exists so that the transformers path, from build to serve, and the model
pipeline run on a real model on a machine with no network. It is deterministic for a given
seed and about 0.5 MiB.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from signing.errors import InputError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = """\
An air gap keeps a machine apart from every network. Models cross it in signed bundles:
the builder packs the weights, the tokenizer and a manifest, the signers sign, and the
appliance verifies every byte before it installs a slot. A slot that fails its health check
is never activated, and the previous slot stays ready for a rollback.
The quick brown fox jumps over the lazy dog. 0123456789, (a, b) [c] {d} <e> "f" 'g'.
User: hello, how are you? Assistant: fine, thank you. System: you are a helpful assistant.
"""


def write_tiny_llama_hf(
    out_dir: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    vocab: int = 384,
    context: int = 512,
    seed: int = 0,
    tokenizer: Literal["byte-level", "llama"] = "byte-level",
) -> None:
    """Write a LlamaForCausalLM with random weights and its tokenizer to ``out_dir``."""
    # Set before transformers is imported: building this model never needs the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        # Imported here: generating this model is the optional 'transformers' extra.
        import torch  # noqa: PLC0415
        from transformers import (  # noqa: PLC0415
            GenerationConfig,
            LlamaConfig,
            LlamaForCausalLM,
            PreTrainedTokenizerFast,
        )
    except ImportError:
        raise InputError(
            "generating a transformers model needs the 'transformers' extra: "
            "pip install 'airgap-appliance[transformers]'"
        ) from None
    backend_tokenizer = (
        _train_llama_tokenizer(vocab) if tokenizer == "llama" else _train_tokenizer(vocab)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend_tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=context,
    )
    config = LlamaConfig(
        vocab_size=backend_tokenizer.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=context,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # seed the weights, not the caller's generator
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # The template in tokenizer_config.json, where every transformers version looks for it.
    fast.save_pretrained(out_dir, save_jinja_files=False)
    # save_pretrained writes the weights with mode 0600 and the rest by the umask: give every
    # file one mode, so the output does not depend on how each was written.
    for path in out_dir.iterdir():
        path.chmod(0o644)


def _train_tokenizer(vocab: int) -> Tokenizer:
    from tokenizers import (  # noqa: PLC0415
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
    )
    return tokenizer


def _train_llama_tokenizer(vocab: int) -> Tokenizer:
    """A Llama 2 style tokenizer: ``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens, then BPE
    pieces trained on the corpus with spaces as ``▁``; unknown characters fall back to bytes."""
    from tokenizers import (  # noqa: PLC0415
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
        trainers,
    )

    space = "\u2581"
    fixed = [UNK, BOS, EOS, *(f"<0x{b:02X}>" for b in range(256))]
    # Trained first on its own, then laid out after the fixed tokens, as Llama 2's file is.
    trainer_tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab - len(fixed), 64), special_tokens=[], show_progress=False
    )
    lines = [space + line.replace(" ", space) for line in _CORPUS.splitlines()]
    trainer_tokenizer.train_from_iterator(lines, trainer=trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    pieces = sorted(trained["vocab"].items(), key=lambda item: item[1])
    table = {token: i for i, token in enumerate(fixed)}
    for piece, _ in pieces:
        table.setdefault(piece, len(table))
    # tokenizers writes merges as ["a", "b"] pairs (older versions: "a b" strings)
    merges: list[tuple[str, str]] = [
        (m.split(" ")[0], m.split(" ")[1]) if isinstance(m, str) else (m[0], m[1])
        for m in trained["merges"]
    ]
    tokenizer = Tokenizer(
        models.BPE(table, merges, unk_token=UNK, byte_fallback=True, fuse_unk=True)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(space), normalizers.Replace(" ", space)]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(space, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS)]
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (PAD, *ROLE_TOKENS)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
    )
    return tokenizer
