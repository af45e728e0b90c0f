"""Generated GGUF models of known behaviour, and the evaluation set they are known to answer
(tests/test_eval_gate.py, bench/bench_evalgate.py).

- The *echo* model: identity embeddings and output, a block that adds nothing to the residual
  stream; the last position's hidden state is its own token's one-hot embedding, so greedy
  decoding repeats the prompt's last byte. It answers every item of :func:`choice_set` right.
- The *constant* model: one output row, so it always says the same byte: right on the items
  whose answer is that byte (a quarter of the choice items for "A").
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.tinymodel import CHAT_TEMPLATE

LABELS = "ABCD"
CHOICES = 40
CHATS = 4


def write_model(out: Path, *, answer: str | None, scale: float = 10.0) -> None:
    """A llama GGUF of known behaviour: ``answer=None`` repeats the prompt's last byte (echo);
    else it always says ``answer``. One layer whose blocks add nothing to the residual
    stream, so the last position's hidden state is its token's (one-hot) embedding."""
    import gguf
    import numpy as np

    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    n_vocab, n_embd, n_head, n_ff = len(tokens), 272, 4, 32
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("eval gate test model")
    writer.add_context_length(256)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(1)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types([3] * 3 + [6] * 256)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    output = np.zeros((n_vocab, n_embd), dtype=np.float32)
    if answer is None:
        output[:, :n_vocab] = np.eye(n_vocab, dtype=np.float32) * scale
    else:
        output[3 + ord(answer), :n_vocab] = scale
    writer.add_tensor("token_embd.weight", np.eye(n_vocab, n_embd, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        writer.add_tensor(f"blk.0.{name}.weight", np.zeros((n_embd, n_embd), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("blk.0.ffn_gate.weight", np.zeros((n_ff, n_embd), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((n_ff, n_embd), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_down.weight", np.zeros((n_embd, n_ff), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def choice_set() -> list[str]:
    """Forty items whose answer is the last letter of the prompt, A, B, C, D in turn (the echo
    model gets all right, the constant one a quarter); then four chat items, through the
    model's chat template, whose regex any answer passes (both models get them right)."""
    lines = []
    for i in range(CHATS):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        lines.append(
            json.dumps(
                {"id": f"c{i}", "messages": messages, "expected": r"[\s\S]", "check": "regex"}
            )
        )
    for i in range(CHOICES):
        label = LABELS[i % 4]
        lines.append(
            json.dumps(
                {
                    "id": f"q{i:02d}",
                    "prompt": f"Question {i}: which option? Answer: {label}",
                    "expected": label,
                    "check": "choice",
                }
            )
        )
    return lines
