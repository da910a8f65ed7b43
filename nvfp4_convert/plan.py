"""Planning from headers only: what each tensor becomes, fusion groups, and the output layout.

No tensor data is read here. The plan is deterministic for a given source and options, which is what
makes an interrupted conversion resumable to byte-identical output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .constants import BLOCK, quantized_tensors
from .errors import ConvertError
from .exclusions import exclude_list, mtp_prefixes, vllm_forms
from .fp8 import DROPPED_SUFFIXES, Fp8Weight, fp8_weights, source_flavour
from .recipes import Recipe
from .safetensors_io import FLOAT_DTYPES, OutTensor
from .sources.base import ShardHeader, TensorInfo
from .stacked import check_convertible, stacked_experts, unfuse
from .stacked import outputs as stacked_outputs

_QUANTIZED_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".weight_scale_2", ".input_scale", ".weight_packed",
                       ".qweight", ".qzeros", ".scales", ".weight_global_scale", ".SCB")
EXPERT_MODULE = re.compile(r"^(?P<layer>.*\.experts)\.\d+\.(?P<leaf>[^.]+)$")  # a MoE expert's Linear


@dataclass(frozen=True)
class SourceTensor:
    """A tensor of the source checkpoint and the shard holding it."""

    shard: str
    info: TensorInfo

    @property
    def name(self) -> str:
        return self.info.name


@dataclass(frozen=True)
class Unit:
    """Work done in one go and written to one output shard: a fusion group, or one kept tensor."""

    modules: tuple[str, ...] = ()  # quantized modules sharing one weight_scale_2 / input_scale
    kept: str | None = None  # a tensor copied byte for byte (an FP8 one: dequantized to BF16)
    stacked: str | None = None  # a fused 3-D expert tensor quantized expert by expert (see ``stacked``)
    outputs: tuple[OutTensor, ...] = ()
    sources: frozenset[str] = frozenset()  # source shards it reads
    nbytes: int = field(init=False, compare=False, repr=False)  # of its outputs

    def __post_init__(self):
        object.__setattr__(self, "nbytes", sum(t.nbytes for t in self.outputs))


@dataclass
class OutputShard:
    filename: str
    units: list[Unit] = field(default_factory=list)

    @property
    def tensors(self) -> list[OutTensor]:
        return [t for u in self.units for t in u.outputs]

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)


@dataclass
class Plan:
    """Everything the converter will do, decided before any tensor data is read."""

    tensors: dict[str, SourceTensor]
    quantized: dict[str, SourceTensor]  # module -> its weight
    groups: list[tuple[str, ...]]
    exclude_modules: list[str]
    shards: list[OutputShard]
    source_shards: list[str]
    weight_only: bool
    warnings: list[str]
    kept_reasons: dict[str, str]  # module -> why it stays high precision
    headers: dict[str, ShardHeader]
    fp8: dict[str, Fp8Weight] = field(default_factory=dict)  # FP8 source weight -> its scale
    fp8_flavour: str | None = None
    stacked: frozenset[str] = frozenset()  # fused 3-D expert tensors, quantized 3-D

    def reads(self, name: str) -> list[str]:
        """The source tensors needed to produce weight ``name`` (an FP8 one needs its scale too)."""
        return [name, self.fp8[name].scale] if name in self.fp8 else [name]

    def compute_dtype(self, name: str) -> str:
        """The dtype source tensor ``name`` is quantized or written in (FP8 weights: BF16)."""
        return "BF16" if name in self.fp8 else self.tensors[name].info.dtype

    @property
    def bytes_in(self) -> int:
        return sum(t.info.nbytes for t in self.tensors.values())

    @property
    def bytes_out(self) -> int:
        return sum(s.nbytes for s in self.shards)


def _module(name: str) -> str | None:
    return name[: -len(".weight")] if name.endswith(".weight") else None


def _outputs(module: str, info: TensorInfo, weight_only: bool) -> tuple[OutTensor, ...]:
    return tuple(OutTensor(*spec) for spec in quantized_tensors(module, info.shape, weight_only=weight_only))


def collect_tensors(headers: dict[str, ShardHeader], weight_map: dict[str, str] | None, *,
                    where: str) -> dict[str, SourceTensor]:
    """Every source tensor in streaming order (shard, then position), checked against the index."""
    tensors: dict[str, SourceTensor] = {}
    for shard in sorted(headers):
        for info in sorted(headers[shard].tensors.values(), key=lambda t: t.data_offsets):
            if info.name in tensors:
                raise ConvertError(f"duplicate tensor name {info.name!r} in {tensors[info.name].shard} and {shard}",
                                   where=where, fix="Re-export the checkpoint; each tensor must appear once")
            tensors[info.name] = SourceTensor(shard, info)
    for name, shard in (weight_map or {}).items():
        if name not in tensors or tensors[name].shard != shard:
            raise ConvertError(f"the index puts {name!r} in {shard}, but that shard does not hold it",
                               where=f"{where}/model.safetensors.index.json",
                               fix="Re-export or re-download the checkpoint")
    return tensors


def check_not_quantized(config: dict, tensors: dict[str, SourceTensor], *, where: str,
                        handled: frozenset[str] | set[str] = frozenset()) -> None:
    """Refuse sources that are already quantized (GPTQ, NVFP4, ...), except the FP8 flavours that
    dequantize (their weights and scales are ``handled``)."""
    fp8 = source_flavour(config, where=where)
    for name, t in tensors.items():
        if name in handled or fp8 is not None and t.info.dtype == "F8_E4M3":
            continue
        if name.endswith(_QUANTIZED_SUFFIXES) or (name.endswith(".weight") and t.info.dtype.startswith("F8")):
            raise ConvertError(f"the source is already quantized (tensor {name!r}, {t.info.dtype})", where=where,
                               fix="Convert from the BF16/FP16 checkpoint instead")


def build_plan(*, config: dict, headers: dict[str, ShardHeader], weight_map: dict[str, str] | None, recipe: Recipe,
               weight_only: bool = False, max_shard_size: int = 5 * 10**9, where: str = "source") -> Plan:
    """Classify every tensor, form fusion groups and lay out the output shards.

    Args:
        config: the source ``config.json``.
        headers: every source shard's header.
        weight_map: the index's tensor -> shard map, if any.
        recipe: what to quantize, exclude and fuse.
        weight_only: W4A16 (no ``input_scale``) instead of W4A4.
        max_shard_size: output shard size limit in bytes (a single larger unit gets a shard of its own).
        where: the source's description, for messages.
    """
    headers, weight_map, unfused = unfuse(config, headers, weight_map, where=where)
    tensors = collect_tensors(headers, weight_map, where=where)
    flavour = source_flavour(config, where=where)
    fp8, not_carried = fp8_weights(flavour, tensors, where=where)
    check_not_quantized(config, tensors, where=where, handled=not_carried)
    warnings: list[str] = []
    if unfused:
        warnings.append(f"{len(unfused)} fused 3-D expert tensors (e.g. {unfused[0].name} {list(unfused[0].shape)}) "
                        "are read as one Linear per expert (experts.N.gate_proj/up_proj/down_proj), as ModelOpt "
                        "exports them and engines load them")
    if dropped := sorted(n for n in not_carried if n.endswith(DROPPED_SUFFIXES)):
        warnings.append(f"{len(dropped)} activation/KV-cache scales of the FP8 source (e.g. {dropped[0]}) do not "
                        "apply to NVFP4 and are dropped")
    tensors_out = {n: t for n, t in tensors.items() if n not in not_carried}
    kept_reasons: dict[str, str] = {}

    linear_like = {m: t for n, t in tensors_out.items() if (m := _module(n)) and len(t.info.shape) >= 2}
    stacked = set(stacked_experts(tensors_out))
    candidates: dict[str, SourceTensor] = {}
    conv1d: list[str] = []
    for module, t in linear_like.items():
        if why := recipe.exclusion(module):
            kept_reasons[module] = why
        elif recipe.matches("conv1d", module):
            kept_reasons[module] = "Hugging Face Conv1D weight, stored [in, out]"
            conv1d.append(module)
        elif len(t.info.shape) != 2 or t.info.dtype not in FLOAT_DTYPES and t.name not in fp8:
            kept_reasons[module] = f"not a 2-D float weight ({t.info.dtype}{list(t.info.shape)})"
        elif t.info.shape[1] % BLOCK:
            kept_reasons[module] = f"in_features {t.info.shape[1]} is not a multiple of 16"
            if not EXPERT_MODULE.match(module):  # experts: one warning for their whole layer, below
                warnings.append(f"{module}: {kept_reasons[module]}; kept in {t.info.dtype}")
        else:
            candidates[module] = t
    for name in stacked:
        if not recipe.matches("quantize", name) or recipe.matches("exclude", name):
            kept_reasons[name] = "excluded by recipe"
        else:
            check_convertible(config, name, tensors_out[name].info, where=where)
            candidates[name] = tensors_out[name]
    if kept_stacked := sorted(n for n in stacked if n not in candidates):
        t = tensors_out[kept_stacked[0]].info
        warnings.append(f"{len(kept_stacked)} fused 3-D expert tensors (e.g. {kept_stacked[0]} {list(t.shape)}) are "
                        f"excluded by the recipe and stay {t.dtype}")
    linear_like.update({n: tensors_out[n] for n in stacked})  # for the exclusions when kept
    if conv1d:
        dtype = linear_like[conv1d[0]].info.dtype
        warnings.append(f"{len(conv1d)} Hugging Face Conv1D weights (e.g. {conv1d[0]}) stay {dtype}: they are stored "
                        "[in, out] and engines transpose them at load, so NVFP4 blocks cannot run along their input "
                        "dimension here")

    groups = fusion_groups(linear_like, recipe)
    for group in groups:  # a fused group is quantized whole or not at all
        if first := _keep_together(group, candidates, kept_reasons):
            warnings.append(f"{', '.join(group)} share an input; {first} stays high precision, so all of them do")
    _keep_experts_together(linear_like, candidates, kept_reasons, warnings)

    quantized = dict(candidates)
    position = {_module(n): i for i, n in enumerate(tensors_out) if n.endswith(".weight")}
    group_of = {m: tuple(sorted(g, key=position.__getitem__)) for g in groups for m in g}
    quant_groups: list[tuple[str, ...]] = []
    units: list[Unit] = []
    emitted: set[str] = set()
    def shards_of(names) -> frozenset[str]:
        shards = set()
        for n in names:
            shards.add(tensors[n].shard)
            if n in fp8:
                shards.add(tensors[fp8[n].scale].shard)
        return frozenset(shards)

    for name, t in tensors_out.items():
        module = _module(name)
        if name in stacked and name in quantized:
            quant_groups.append((name,))
            units.append(Unit(stacked=name, outputs=stacked_outputs(name, t.info.shape, weight_only),
                              sources=shards_of([name])))
        elif module in quantized:
            if module in emitted:
                continue
            members = tuple(m for m in group_of.get(module, (module,)) if m in quantized)
            emitted.update(members)
            quant_groups.append(members)
            outs = tuple(o for m in members for o in _outputs(m, quantized[m].info, weight_only))
            units.append(Unit(modules=members, outputs=outs, sources=shards_of(f"{m}.weight" for m in members)))
        else:
            dtype = "BF16" if name in fp8 else t.info.dtype
            units.append(Unit(kept=name, outputs=(OutTensor(name, dtype, t.info.shape),), sources=shards_of([name])))

    served = engine_names(quantized, groups, recipe)
    exclude = _exclude_modules(config, tensors_out, linear_like, quantized, groups, recipe, served)
    for entry, clash in substring_clashes(exclude, served).items():
        warnings.append(f"exclusion {entry!r} is a substring of quantized module {clash!r}; vLLM may skip it")
    return Plan(tensors=tensors, quantized=quantized, groups=quant_groups, exclude_modules=exclude,
                shards=_layout_shards(units, max_shard_size), source_shards=sorted(headers),
                weight_only=weight_only, warnings=warnings, kept_reasons=kept_reasons, headers=headers, fp8=fp8,
                stacked=frozenset(stacked),
                fp8_flavour=flavour.flavour if flavour else None)


def fusion_groups(linear_like: dict[str, SourceTensor], recipe: Recipe) -> list[tuple[str, ...]]:
    """Union of the recipe's sibling sets that exist in the checkpoint (a module may sit in two rules)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for module in linear_like:
        head, _, leaf = module.rpartition(".")
        for rule in recipe.fuse:
            if leaf in rule.members:
                siblings = [f"{head}.{m}" if head else m for m in rule.members]
                present = [s for s in siblings if s in linear_like]
                for s in present:
                    parent[find(s)] = find(module)
    clusters: dict[str, list[str]] = {}
    for m in parent:
        clusters.setdefault(find(m), []).append(m)
    return [tuple(sorted(c)) for c in clusters.values() if len(c) > 1]


def _keep_experts_together(linear_like, candidates, kept_reasons, warnings) -> None:
    """MoE engines load a layer's experts as one module in one format: every expert and every projection of
    a layer is quantized, or none is."""
    by_layer: dict[str, list[str]] = {}
    for module in linear_like:
        if m := EXPERT_MODULE.match(module):
            by_layer.setdefault(m["layer"], []).append(module)
    for layer, experts in sorted(by_layer.items()):
        if first := _keep_together(experts, candidates, kept_reasons):
            warnings.append(f"{layer}: {first} stays high precision ({kept_reasons[first]}), so every expert "
                            "projection of this MoE layer does")


def _keep_together(members, candidates: dict, kept_reasons: dict) -> str | None:
    """If some of ``members`` are kept and others would be quantized, keep them all; return the first kept."""
    kept = [m for m in members if m not in candidates]
    if not kept or len(kept) == len(members):
        return None
    for m in members:
        if candidates.pop(m, None) is not None:
            kept_reasons[m] = f"kept together with {kept[0]}"
    return kept[0]


def engine_names(quantized: dict, groups: list[tuple[str, ...]], recipe: Recipe) -> list[str]:
    """Quantized module names as serving engines see them (fused aliases included)."""
    names = list(quantized)
    aliases = {frozenset(r.members): r.alias for r in recipe.fuse if r.alias}
    for group in groups:
        head = group[0].rpartition(".")[0]
        for members, alias in aliases.items():
            if {m.rpartition(".")[2] for m in group} <= members and all(m in quantized for m in group):
                names.append(f"{head}.{alias}")
    return names


def substring_clashes(entries: list[str], names: list[str]) -> dict[str, str]:
    """``entries`` whose wildcard-free form is a substring of one of ``names``, with the first such name.

    vLLM also skips a module when an exclusion is a plain substring of its name, after rewriting ``X*``
    into ``X`` and ``X.*`` (:func:`.exclusions.vllm_forms`). One search of each entry through all names
    joined together keeps this linear in their total length.
    """
    joined = "\n" + "\n".join(names) + "\n"
    clashes = {}
    for entry in entries:
        for form in vllm_forms(entry):
            if "*" in form or "\n" in form or (at := joined.find(form)) < 0:
                continue
            start = joined.rfind("\n", 0, at) + 1
            clashes[entry] = joined[start : joined.index("\n", at)]
            break
    return clashes


def _exclude_modules(config, tensors, linear_like, quantized, groups, recipe: Recipe, served: list[str]) -> list[str]:
    """``exclude_modules`` as ModelOpt writes it (see :mod:`.exclusions`), fused aliases of kept groups included."""
    names = [m for m in linear_like if m not in quantized]
    if "lm_head.weight" not in tensors and "language_model.lm_head.weight" not in tensors:
        # a tied head has no tensor of its own; ModelOpt lists it all the same, under the layout's name
        hub_vl = any(n.startswith("language_model.model.") for n in tensors)
        names.append("language_model.lm_head" if hub_vl else "lm_head")
    aliases = {frozenset(r.members): r.alias for r in recipe.fuse if r.alias}
    for group in groups:
        if not any(m in quantized for m in group):
            head = group[0].rpartition(".")[0]
            leaves = {m.rpartition(".")[2] for m in group}
            names.extend(f"{head}.{alias}" for members, alias in aliases.items() if leaves <= members)
    return exclude_list(names, served, mtp_prefixes(config, linear_like))


def _layout_shards(units: list[Unit], max_shard_size: int) -> list[OutputShard]:
    shards: list[OutputShard] = [OutputShard("")]
    size = 0  # of the last shard, kept as a running sum: plans hold ~10^5 units
    for unit in units:
        current = shards[-1]
        if current.units and size + unit.nbytes > max_shard_size:
            current = OutputShard("")
            shards.append(current)
            size = 0
        current.units.append(unit)
        size += unit.nbytes
    total = len(shards)
    for i, shard in enumerate(shards, 1):
        shard.filename = f"model-{i:05d}-of-{total:05d}.safetensors"
    return shards
