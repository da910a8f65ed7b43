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


def _add_mtp_layer(model, path: Path) -> None:
    """Append a DeepSeek multi-token-prediction layer ``model.layers.{num_hidden_layers}`` as its own shard.

    transformers drops these tensors; real checkpoints carry a full MoE decoder layer plus the MTP head.
    """
    from safetensors.torch import save_file

    config = model.config
    last, mtp = config.num_hidden_layers - 1, config.num_hidden_layers
    hidden, vocab = config.hidden_size, config.vocab_size
    source = f"model.layers.{last}."
    tensors = {k.replace(source, f"model.layers.{mtp}.", 1): v.detach().clone().contiguous()
               for k, v in model.state_dict().items() if k.startswith(source)}
    g = torch.Generator().manual_seed(mtp)
    dtype = next(iter(tensors.values())).dtype
    for name, shape in (("enorm", (hidden,)), ("hnorm", (hidden,)), ("eh_proj", (hidden, 2 * hidden)),
                        ("shared_head.norm", (hidden,)), ("shared_head.head", (vocab, hidden)),
                        ("embed_tokens", (vocab, hidden))):
        tensors[f"model.layers.{mtp}.{name}.weight"] = torch.randn(shape, generator=g).to(dtype)
    save_file(tensors, path / "model-mtp.safetensors", metadata={"format": "pt"})
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(tensors, "model-mtp.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_tiny(kind: str, path: Path, *, max_shard_size: str = "40KB", seed: int = 0,
               dtype: torch.dtype = torch.bfloat16, tie_word_embeddings: bool = False, mtp: bool = False) -> Path:
    """Save a random ``kind`` model to ``path`` with small shards so fused groups straddle shards.

    ``mtp`` adds DeepSeek's multi-token-prediction layer after the decoder stack."""
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
    if mtp:
        _add_mtp_layer(model, path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return path
