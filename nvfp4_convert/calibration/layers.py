"""The model as transformers defines it, built on the meta device and materialized one decoder layer at a time.

The architecture comes from ``config.json`` through transformers' own classes (never remote code), built with
its public ``from_config`` on the meta device; the model's own rotary-embedding classes compute their buffers.
Weights whose checkpoint names are the module's own (every dense architecture) are loaded with PyTorch's
``load_state_dict(assign=True)``; only where transformers rearranges checkpoint tensors at load time (fused
3-D MoE experts) is its own weight-conversion loader used, so each layer computes exactly what the full model
would.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..errors import ConvertError


def build_skeleton(config: dict, *, dtype: torch.dtype, where: str):
    """A causal LM for ``config`` with every parameter on the meta device (buffers real, on the CPU).

    A vision-language model transformers has no causal-LM class for (Qwen2.5-VL) is built as its
    image-text-to-text model, whose language model is run on text alone.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    transformers.utils.logging.disable_progress_bar()
    model_type = config.get("model_type")
    config = {k: v for k, v in config.items() if k != "quantization_config"}  # FP8 weights arrive dequantized
    try:
        hf_config = AutoConfig.for_model(**config)
    except Exception as exc:  # transformers parsing a config it was not written for fails in many ways
        custom = " (it is defined by custom code in the repo, which is never run)" if "auto_map" in config else ""
        raise ConvertError(f"transformers {transformers.__version__} cannot build model type {model_type!r}{custom}",
                           where=f"{where}/config.json",
                           fix="Calibration needs an architecture transformers ships; convert without --calibrate"
                           ) from exc
    auto = AutoModelForCausalLM
    if type(hf_config) not in auto._model_mapping and type(hf_config) in AutoModelForImageTextToText._model_mapping:
        auto = AutoModelForImageTextToText
    try:
        model = _from_config(auto, hf_config, dtype=dtype)
    except Exception as exc:
        raise ConvertError(f"transformers cannot build a causal LM for model type {model_type!r} "
                           f"({(str(exc).splitlines() or [type(exc).__name__])[0][:160]})",
                           where=f"{where}/config.json",
                           fix="Calibration needs a decoder-only architecture transformers ships") from None
    model.eval()
    model.requires_grad_(False)
    _eager_experts(model.config)
    _materialize_buffers(model)
    return model


def _from_config(auto, hf_config, *, dtype: torch.dtype):
    """The model on the meta device, with PyTorch's SDPA attention where the architecture supports it
    (Gemma 2's soft-capped attention does not: its own eager attention then)."""
    with torch.device("meta"):
        try:
            return auto.from_config(hf_config, dtype=dtype, trust_remote_code=False, attn_implementation="sdpa")
        except ValueError as exc:
            if "attention" not in str(exc):
                raise
        return auto.from_config(hf_config, dtype=dtype, trust_remote_code=False, attn_implementation="eager")


def _eager_experts(config) -> None:
    """Fused MoE experts run their per-expert ``F.linear`` path, as ModelOpt forces for calibration
    (the grouped-matmul path computes the same experts without per-expert Linear calls to observe)."""
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"
    for sub in ("text_config", "vision_config", "audio_config", "speech_config"):
        if getattr(config, sub, None) is not None and getattr(config, sub) is not config:
            _eager_experts(getattr(config, sub))


def _materialize_buffers(model) -> None:
    """Non-persistent buffers (rotary frequencies, ...) are computed, not loaded: compute them on the CPU.

    A module holding such buffers (a rotary embedding) is built again on the CPU from its own class and
    config, and its buffers are taken from there; other modules' (a scaled embedding's ``embed_scale``) are
    set by the model's own weight initialization.
    """
    for module in model.modules():
        meta = [n for n in module._non_persistent_buffers_set if getattr(module, n, None) is not None
                and module._buffers[n].is_meta]
        if not meta:
            continue
        fresh = _rebuilt_on_cpu(module, model.config)
        for name in meta:
            buffer = getattr(fresh, name, None) if fresh is not None else None
            if isinstance(buffer, torch.Tensor) and buffer.shape == module._buffers[name].shape:
                module._buffers[name] = buffer
            else:  # not a config-built module (e.g. a scaled embedding): the model's own initialization
                module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
                model._init_weights(module)
    for name, buf in model.named_non_persistent_buffers():
        if buf.is_meta:
            raise ConvertError(f"cannot compute buffer {name} of {type(model).__name__} off the meta device",
                               where="calibration", fix="Convert without --calibrate")


def _rebuilt_on_cpu(module: nn.Module, model_config) -> nn.Module | None:
    """``type(module)(config=...)`` on the CPU, with the config the module holds (else the text config)."""
    config = getattr(module, "config", None) or model_config.get_text_config()
    try:
        with torch.device("cpu"):
            return type(module)(config=config)
    except TypeError:
        return None


def decoder_layers(model) -> tuple[str, nn.Module, nn.ModuleList]:
    """``(prefix, owner, layers)``: the decoder layers' ModuleList, its name and the module whose forward runs them."""
    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= count and name.endswith("layers"):
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            return name, owner, module
    raise ConvertError(f"cannot find the decoder layers of {type(model).__name__}", where="calibration",
                       fix="Convert without --calibrate")


def own_names(model, names: list[str]) -> dict[str, str]:
    """Each checkpoint tensor name as the model names it, by transformers' own load-time renamings.

    Checkpoints of one architecture come in several layouts (Gemma 3's Hub files hold
    ``language_model.model.layers.*``, Qwen2.5-VL's ``model.layers.*``, and transformers 5 builds both as
    ``model.language_model.layers.*``); names no renaming applies to stay as they are.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: checkpoint names are the model's own
        return {n: n for n in names}
    renamings = [r for r in get_model_conversion_mapping(model) if isinstance(r, WeightRenaming)]
    own = model.state_dict(keep_vars=True)
    out = {}
    for name in names:
        renamed, _ = rename_source_key(name, renamings, [], model.base_model_prefix, own)
        out[name] = renamed if renamed in own or name not in own else name
    return out


@contextlib.contextmanager
def loaded_on_call(model, names: list[str], load: Callable[[list[str]], None]) -> Iterator[None]:
    """While the block runs, ``load`` loads each module's tensors among ``names`` (checkpoint names) just
    before its first forward, so what the model never runs (its final norm, a vision tower) is never read.
    Tensors not named as the model's own are loaded up front."""
    renamed = own_names(model, names)
    state = model.state_dict(keep_vars=True)
    by_module: dict[str, list[str]] = {}
    for name in names:
        if renamed[name] in state:
            by_module.setdefault(renamed[name].rpartition(".")[0], []).append(name)
    if eager := [n for n in names if renamed[n] not in state]:
        load(eager)
    handles = []

    def hook(group: list[str], module, args) -> None:
        if group:
            load(list(group))
            group.clear()

    for path, group in by_module.items():
        module = model.get_submodule(path) if path else model
        handles.append(module.register_forward_pre_hook(functools.partial(hook, group)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def load_into(model, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype, device: torch.device) -> None:
    """Load source tensors (checkpoint names) into ``model`` on ``device``.

    Tensors that are, once renamed as transformers loads them (:func:`own_names`), named and shaped as the
    model's own parameters and buffers are assigned directly (PyTorch's ``load_state_dict``); the others go
    through transformers' checkpoint conversion (fused MoE experts).
    """
    own = model.state_dict(keep_vars=True)
    names = own_names(model, list(tensors))
    direct = {names[n]: t for n, t in tensors.items()
              if names[n] in own and tuple(own[names[n]].shape) == tuple(t.shape)}
    if direct:
        floating = {n: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                    for n, t in direct.items()}
        result = model.load_state_dict(floating, strict=False, assign=True)
        if result.unexpected_keys:
            raise ConvertError(f"transformers could not load these weights into the model "
                               f"({', '.join(sorted(result.unexpected_keys)[:3])})", where="calibration",
                               fix="Check that config.json matches the weights")
    rest = {n: t for n, t in tensors.items() if names[n] not in direct}
    if rest:
        _load_converted(model, rest, dtype=dtype)


def _load_converted(model, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype) -> None:
    """Checkpoint tensors that transformers rearranges at load time (fused experts), through its own loader."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:
        import transformers

        raise ConvertError(f"transformers {transformers.__version__} has no checkpoint-conversion loader for "
                           f"{type(model).__name__} (e.g. {next(iter(tensors))})", where="calibration",
                           fix="Install transformers 5.x as the calib extra declares, or convert without "
                               "--calibrate") from None
    config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model), dtype=dtype)
    info = convert_and_load_state_dict_in_model(model=model, state_dict=dict(tensors), load_config=config)
    info = info[0] if isinstance(info, tuple) else info
    problems = [*getattr(info, "error_msgs", []), *getattr(info, "mismatched_keys", [])]
    if problems or getattr(info, "unexpected_keys", None):
        detail = "; ".join(str(p) for p in [*problems, *sorted(info.unexpected_keys)][:3])
        raise ConvertError(f"transformers could not load these weights into the model ({detail})",
                           where="calibration", fix="Check that config.json matches the weights")


def to_device(module: nn.Module, device: torch.device) -> None:
    """Move a module's real parameters and buffers to ``device`` (meta ones stay)."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in store.items():
                if t is not None and not t.is_meta and t.device != device:
                    moved = t.to(device)
                    store[name] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved


def free(module: nn.Module) -> None:
    """Drop a module's weights back to the meta device."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None and not p.is_meta:
                sub._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)


def checkpoint_rows(model, prefix: str, layer: nn.Module, names: list[str]) -> dict[str, tuple[str, int, int]]:
    """Where each checkpoint weight of a layer lives: ``name -> (parameter, first row, rows)``.

    ``names`` are the layer's checkpoint tensors. When all are named (once renamed, see :func:`own_names`) as
    the layer's own parameters and buffers, each weight is its parameter. Otherwise transformers' save-time
    conversion (the inverse of its load-time one) turns the layer's parameters back into checkpoint tensors,
    splitting fused ones (e.g. stacked experts). It is run on tensors holding each parameter row's index (one
    column, so it costs nothing), which tells which rows of which parameter
    every checkpoint tensor is made of.
    """
    params = [(n, p) for n, p in layer.named_parameters() if p.dim() >= 2]
    own = {f"{prefix}.{n}": (n, p) for n, p in params}
    state = layer.state_dict(keep_vars=True)
    renamed = own_names(model, names)
    if all(renamed[n].startswith(f"{prefix}.") and renamed[n][len(prefix) + 1:] in state for n in names):
        return {n: (own[r][0], 0, own[r][1].numel() // own[r][1].shape[-1]) for n in names
                if (r := renamed[n]) in own}
    from transformers.core_model_loading import revert_weight_conversion

    codes = {f"{prefix}.{n}": (torch.arange(p.numel() // p.shape[-1], dtype=torch.float64) + i * 2.0**40)
             .view(*p.shape[:-1], 1) for i, (n, p) in enumerate(params)}
    rows: dict[str, tuple[str, int, int]] = {}
    for name, t in revert_weight_conversion(model, codes).items():
        flat = t.reshape(-1).to(torch.float64)
        if t.shape[-1] != 1 or not flat.numel():
            continue  # not a row-wise rearrangement of a parameter
        pid, first = divmod(int(flat[0].item()), 2**40)
        if pid >= len(params) or not torch.equal(flat, flat[0] + torch.arange(flat.numel(), dtype=torch.float64)):
            continue
        rows[name] = (params[pid][0], first, flat.numel())
    return rows


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records the keyword arguments the model passes it."""

    def __init__(self, index: int, record: dict, last: bool):
        super().__init__()
        self.index, self.record, self.last = index, record, last

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise ConvertError("decoder layers take positional arguments besides the hidden states",
                               where="calibration", fix="Convert without --calibrate")
        self.record[self.index] = (hidden_states, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


@contextlib.contextmanager
def catching(layers: nn.ModuleList, count: int) -> Iterator[dict[int, tuple[torch.Tensor, dict]]]:
    """Replace the first ``count`` decoder layers by recorders while the block runs; restore them after."""
    original = list(layers)
    record: dict[int, tuple[torch.Tensor, dict]] = {}
    for i in range(count):
        layers[i] = _Catcher(i, record, last=i == count - 1)
    try:
        yield record
    finally:
        for i, layer in enumerate(original):
            layers[i] = layer


def layer_inputs(owner: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, count: int
                 ) -> tuple[torch.Tensor, list[dict]]:
    """Embed ``input_ids`` and return the first layer's hidden states and each layer's keyword arguments."""
    with catching(layers, count) as record, torch.no_grad():
        try:
            owner(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
    if len(record) < count:
        raise ConvertError(f"the model ran {len(record)} of {count} decoder layers", where="calibration",
                           fix="Convert without --calibrate")
    return record[0][0], [record[i][1] for i in range(count)]
