"""Generate a tiny Hugging Face (transformers) llama model: the transformers backend's test model.

The directory it writes is what ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load: ``config.json``, ``generation_config.json``,
``model.safetensors`` (random weights), ``tokenizer.json``, ``tokenizer_config.json`` and the
chat template. The tokenizer is a byte-level BPE trained on a short built-in text, so every
string can be encoded, and nothing is downloaded. The model says nothing sensible; it exists so
that the transformers path, from build to serve, runs on a real model on a machine with no
network. It is deterministic for a given seed and about 0.5 MiB.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from signing.errors import InputError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
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
    backend_tokenizer = _train_tokenizer(vocab)
    tokenizer = PreTrainedTokenizerFast(
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
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # seed the weights, not the caller's generator
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # The template in tokenizer_config.json, where every transformers version looks for it.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
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
