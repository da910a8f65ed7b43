"""Tiny random Hugging Face checkpoints built with transformers at test time."""

from __future__ import annotations

import json
from pathlib import Path

import torch

KINDS = ("llama", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3")
# Every family with a recipe; "qwen3_moe_k40" has experts 40 wide (down_proj K % 16 != 0), "qwen2_5_vl" is
# saved with transformers-5 prefixes (model.language_model.*, model.visual.*).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "phi3", "gemma2",
            "gemma3_text", "glm4_moe", "qwen2_5_vl", "gemma3", "gpt2", "qwen3_moe_k40")


def _config(kind: str):
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if kind == "llama":
        return tf.LlamaConfig(intermediate_size=128, **common)
    if kind == "mistral":
        return tf.MistralConfig(intermediate_size=128, head_dim=16, **common)
    if kind == "qwen2":
        return tf.Qwen2Config(intermediate_size=128, **common)
    if kind == "qwen3":
        return tf.Qwen3Config(intermediate_size=128, head_dim=16, **common)
    if kind == "phi3":
        return tf.Phi3Config(intermediate_size=128, pad_token_id=0, **common)
    if kind == "gemma2":
        return tf.Gemma2Config(intermediate_size=128, head_dim=16, **common)
    if kind == "gemma3_text":
        return tf.Gemma3TextConfig(intermediate_size=128, head_dim=16, **common)
    if kind == "glm4_moe":
        return tf.Glm4MoeConfig(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                                num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16,
                                **common)
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                             eos_token_id=0)
    if kind == "qwen2_5_vl":
        text = dict(common, intermediate_size=128, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "fullatt_block_indexes": [1]}
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    if kind == "gemma3":  # vision-language, saved in the Hub layout (language_model.model.*, vision_tower.*)
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "image_size": 28, "patch_size": 14}
        return tf.Gemma3Config(text_config=dict(common, intermediate_size=128, head_dim=16), vision_config=vision,
                               mm_tokens_per_image=4)
    if kind == "qwen3_moe_k40":
        return tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=40, num_experts=4,
                                 num_experts_per_tok=2, head_dim=16, **common)
    if kind == "qwen3_moe_i48":  # no square expert matrix: [2I, H] = [96, 64], [H, I] = [64, 48]
        return tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=48, num_experts=4,
                                 num_experts_per_tok=2, head_dim=16, **common)
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


def _rename(path: Path, prefixes: dict[str, str]) -> None:
    """Rewrite every shard's tensor names by prefix (first match wins), index included."""
    from safetensors.torch import load_file, save_file

    def new(name: str) -> str:
        return next((to + name[len(old):] for old, to in prefixes.items() if name.startswith(old)), name)

    for shard in sorted(path.glob("*.safetensors")):
        save_file({new(k): v for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {new(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def build_tiny(kind: str, path: Path, *, max_shard_size: str = "40KB", seed: int = 0,
               dtype: torch.dtype = torch.bfloat16, tie_word_embeddings: bool = False, mtp: bool = False,
               fused: bool = False) -> Path:
    """Save a random ``kind`` model to ``path`` with small shards so fused groups straddle shards.

    ``mtp`` adds DeepSeek's multi-token-prediction layer after the decoder stack. ``fused`` saves MoE experts
    as transformers 5 holds them in memory (``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
    instead of one Linear per expert."""
    import transformers as tf

    torch.manual_seed(seed)
    config = _config(kind)
    config.tie_word_embeddings = tie_word_embeddings
    if kind in ("qwen2_5_vl", "gemma3"):
        model = tf.AutoModelForImageTextToText.from_config(config).to(dtype)
    else:
        model = tf.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # random init gives tiny values in some layers; spread them a bit
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.empty(p.shape[0], 1).log_normal_(0, 1).to(p.dtype))
    model.save_pretrained(path, max_shard_size=max_shard_size, save_original_format=not fused)
    if mtp:
        _add_mtp_layer(model, path)
    if kind == "qwen2_5_vl":
        _rename(path, {"model.": "model.language_model.", "visual.": "model.visual."})
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return path


def _save_sharded(folder: Path, tensors: dict[str, torch.Tensor], config: dict, shard_bytes: int,
                  *, last: set[str] = frozenset()) -> None:
    """Shards of about ``shard_bytes`` in the given order; tensors in ``last`` go to a final shard of their own."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    groups: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        if name in last:
            continue
        if groups[-1] and size + t.numel() * t.element_size() > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += t.numel() * t.element_size()
    if last:
        groups.append({n: tensors[n] for n in tensors if n in last})
    weight_map = {}
    for i, group in enumerate(groups, 1):
        filename = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in group.items()}, folder / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, filename))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def add_mtp_layer(src: Path, dst: Path) -> Path:
    """``src`` (a tiny DeepSeek-V3) plus a multi-token-prediction layer after the decoder stack, as DeepSeek ships
    it."""
    import shutil

    config = json.loads((src / "config.json").read_text())
    from checks import load_all

    tensors = load_all(src)
    n = config["num_hidden_layers"]
    last, mtp = f"model.layers.{n - 1}.", f"model.layers.{n}."
    extra = {mtp + k[len(last):]: v.clone() for k, v in tensors.items() if k.startswith(last)}
    hidden = config["hidden_size"]
    gen = torch.Generator().manual_seed(1)
    extra.update({
        f"{mtp}embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
        f"{mtp}enorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{mtp}hnorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{mtp}eh_proj.weight": (torch.randn(hidden, 2 * hidden, generator=gen) * 0.05).to(torch.bfloat16),
        f"{mtp}shared_head.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{mtp}shared_head.head.weight": tensors["lm_head.weight"].clone(),
    })
    config["num_nextn_predict_layers"] = 1
    _save_sharded(dst, {**tensors, **extra}, config, 40_000)
    for other in src.iterdir():
        if other.suffix != ".safetensors" and other.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(other, dst / other.name)
    return dst


def fp8_quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block FP8: per block ``scale_inv = amax / 448`` and ``fp8 = weight / scale_inv``."""
    bn, bk = block
    rows, cols = weight.shape
    w = weight.float()
    scale = torch.empty(-(-rows // bn), -(-cols // bk), dtype=torch.float32)
    out = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk]
            scale[i, j] = part.abs().amax().clamp(min=1e-12) / 448.0
            out[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = (part / scale[i, j]).to(torch.float8_e4m3fn)
    return out, scale


def make_fp8(src: Path, dst: Path, *, block: tuple[int, int], is_fp8, shard_bytes: int = 30_000) -> Path:
    """An FP8 copy of BF16 checkpoint ``src`` made the DeepSeek way: every weight ``is_fp8(name)`` picks
    becomes E4M3 with a float32 ``weight_scale_inv`` per block; every third scale goes to a shard of its
    own, away from its weight."""
    import shutil

    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(block)}
    out: dict[str, torch.Tensor] = {}
    from checks import load_all

    for name, t in load_all(src).items():
        if t.dim() == 2 and is_fp8(name):
            out[name], out[f"{name}_scale_inv"] = fp8_quantize(t, block)
        else:
            out[name] = t
    scales = sorted(n for n in out if n.endswith("_scale_inv"))
    _save_sharded(dst, out, config, shard_bytes, last=set(scales[::3]))
    for other in src.iterdir():
        if other.suffix != ".safetensors" and other.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(other, dst / other.name)
    return dst


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


def dequantize_by_blocks(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Independent reference: each block's E4M3 values times its scale in float32, then BF16."""
    bn, bk = block
    out = torch.empty(weight.shape, dtype=torch.bfloat16)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = weight[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].to(torch.float32)
            out[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = (part * scale[i, j]).to(torch.bfloat16)
    return out


def expected_source(fp8_src, dst, block):
    """The BF16 checkpoint the FP8 one stands for: every FP8 weight dequantized, scales gone."""
    from checks import load_all

    tensors = load_all(fp8_src)
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        fp8 = t.dtype == torch.float8_e4m3fn
        out[name] = dequantize_by_blocks(t, tensors[f"{name}_scale_inv"], block) if fp8 else t
    config = json.loads((fp8_src / "config.json").read_text())
    del config["quantization_config"]
    _save_sharded(dst, out, config, 10**9)
    return dst
