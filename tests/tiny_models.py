"""Tiny random Hugging Face checkpoints built with transformers at test time."""

from __future__ import annotations

import json
from pathlib import Path

import torch

KINDS = ("llama", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3")


def _config(kind: str):
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if kind == "llama":
        return tf.LlamaConfig(intermediate_size=128, **common)
    if kind == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                 num_experts=4, num_experts_per_tok=2, **common)
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                 num_experts_per_tok=2, head_dim=16, **common)
    if kind == "mixtral":
        return tf.MixtralConfig(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, **common)
    if kind == "deepseek_v3":
        common.update(num_hidden_layers=3, num_key_value_heads=4)
        return tf.DeepseekV3Config(intermediate_size=128, moe_intermediate_size=32, first_k_dense_replace=1,
                                   n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
                                   topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                                   qk_rope_head_dim=8, v_head_dim=16, **common)
    raise ValueError(kind)


def build_tiny(kind: str, path: Path, *, max_shard_size: str = "40KB", seed: int = 0,
               dtype: torch.dtype = torch.bfloat16, tie_word_embeddings: bool = False) -> Path:
    """Save a random ``kind`` model to ``path`` with small shards so fused groups straddle shards."""
    import transformers as tf

    torch.manual_seed(seed)
    config = _config(kind)
    config.tie_word_embeddings = tie_word_embeddings
    model = tf.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # random init gives tiny values in some layers; spread them a bit
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.empty(p.shape[0], 1).log_normal_(0, 1).to(p.dtype))
    model.save_pretrained(path, max_shard_size=max_shard_size)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return path


def add_byte_tokenizer(path: Path) -> Path:
    """Give a tiny checkpoint a real tokenizer: byte-level, 256 ids, so any text tokenizes (vocab_size 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[10], model_max_length=128)
    fast.save_pretrained(path)
    return path
