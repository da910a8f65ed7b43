"""The structural checks of an NVFP4 output folder: everything that can be checked without the source."""

from __future__ import annotations

import fnmatch
import json
import math
import struct
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config_fields import HF_QUANT_FIELDS, MODEL_FIELDS, field_errors, without_fields
from ..configs import FP4_SCHEME
from ..constants import (
    BLOCK,
    E4M3_MAX,
    GLOBAL_SCALE_MIN,
    INPUT_SCALE,
    QUANTIZED_TENSORS,
    SCALAR_SUFFIXES,
    SCALE_MIN,
    SCALE_SUFFIXES,
    quantized_tensors,
)
from ..errors import ConvertError
from ..exclusions import Matcher
from ..kernels.common import unpack_codes
from ..plan import EXPERT_MODULE, engine_names, fusion_groups, substring_clashes
from ..recipes import load_recipe
from ..safetensors_io import ShardHeader, TensorInfo, read_header, read_rows, read_tensor_bytes
from ..sources.base import SAFETENSORS_INDEX, SINGLE_SHARD
from .report import QUANT_ALGOS, VerifyReport

CHUNK_BYTES = 64 * 1024 * 1024  # raw bytes read at a time


class OutputChecker:
    """The structural checks, in order; later ones skip what earlier ones found broken.

    It also serves the output's tensors to :func:`~nvfp4_convert.verify.compare.compare_with_source`.
    """

    def __init__(self, out: Path, *, progress: bool):
        self.out = out
        self.progress = progress
        self.report = VerifyReport(output=out)
        self.config: dict = {}
        self.exclude: list[str] = []
        self.headers: dict[str, ShardHeader] = {}
        self.tensors: dict[str, tuple[str, TensorInfo]] = {}  # name -> (shard, info)
        self.modules: dict[str, str] = {}  # module -> "nvfp4" or "kept", for 2-D (or U8) weights
        self.scalars: dict[str, bytes] = {}  # name of a 0-dim F32 scale -> its 4 bytes
        self.recipe = None
        self._fds: dict = {}  # shard -> open file, while scalars are read

    def run(self) -> None:
        self.check_configs()
        self.check_index()
        try:
            self.check_tensors()
        finally:
            self.close_files()
        self.check_groups()
        self.check_exclusions()
        self.check_experts()

    # -- config files ----------------------------------------------------------------------------

    def _json(self, name: str) -> dict | None:
        path = self.out / name
        if not path.is_file():
            self.report.add("config files", f"{name} is missing", str(self.out))
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.report.add("config files", f"{name} is not valid JSON ({exc})", str(path))
            return None
        if not isinstance(doc, dict):
            self.report.add("config files", f"{name} is not a JSON object", str(path))
            return None
        return doc

    def _typed(self, name: str, fields: dict[str, str]) -> dict | None:
        """``name`` parsed, each field of the wrong type reported and left out (None when unreadable)."""
        doc = self._json(name)
        if doc is None:
            return None
        errors = field_errors(doc, fields)
        for _, problem in errors:
            self.report.add("config files", f"{name} {problem}", name)
        return without_fields(doc, [field for field, _ in errors])

    def check_configs(self) -> None:
        """Both config files present, in ModelOpt's shapes, and saying the same thing (spec §5)."""
        r = self.report
        r.checked["config files"] = 2
        self.config = self._typed("config.json", MODEL_FIELDS) or {}
        hqc = self._typed("hf_quant_config.json", HF_QUANT_FIELDS)
        qc = self.config.get("quantization_config")
        if self.config and not isinstance(qc, dict):
            r.add("config files", "config.json has no quantization_config", "config.json")
        nested = self._check_nested(hqc) if hqc is not None else None
        flat = self._check_flat(qc) if isinstance(qc, dict) else None
        self.exclude = (nested or flat or {}).get("exclude", [])
        algos = {c["algo"] for c in (nested, flat) if c and c["algo"] is not None}
        for algo in sorted(algos - set(QUANT_ALGOS)):
            r.add("config files", f"quant_algo {algo!r} is not NVFP4 or W4A16_NVFP4", "config files")
        if nested and flat and nested["algo"] != flat["algo"]:
            r.add("config files", f"quant_algo differs: {nested['algo']!r} vs {flat['algo']!r}",
                  "hf_quant_config.json vs config.json")
        if nested and flat and nested["exclude"] != flat["exclude"]:
            r.add("config files", "config.json ignore differs from hf_quant_config.json exclude_modules",
                  "config files")
        r.quant_algo = algos.pop() if len(algos) == 1 else None
        if flat and r.quant_algo in QUANT_ALGOS:
            self._check_config_groups(qc)

    def _check_nested(self, hqc: dict) -> dict | None:
        """``hf_quant_config.json``; returns its quant_algo and exclusions."""
        r, where = self.report, "hf_quant_config.json"
        if (hqc.get("producer") or {}).get("name") != "modelopt":
            r.add("config files", "producer.name is not 'modelopt' (vLLM will not detect the format)", where)
        quant = hqc.get("quantization")
        if not isinstance(quant, dict):
            r.add("config files", "no quantization section", where)
            return None
        for key in ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules"):
            if key not in quant:
                r.add("config files", f"quantization.{key} is missing", where)
        if quant.get("group_size", BLOCK) != BLOCK:
            r.add("config files", f"group_size is {quant.get('group_size')!r}, not {BLOCK}", where)
        if quant.get("kv_cache_quant_algo") is not None:
            r.add("config files", f"kv_cache_quant_algo is {quant['kv_cache_quant_algo']!r}, expected null", where)
        return {"algo": quant.get("quant_algo"),
                "exclude": self._exclude_list(quant.get("exclude_modules", []), "exclude_modules", where)}

    def _check_flat(self, qc: dict) -> dict:
        """``config.json`` ``quantization_config``; returns its quant_algo and exclusions."""
        r, where = self.report, "config.json quantization_config"
        if qc.get("quant_method") != "modelopt":
            r.add("config files", f"quant_method is {qc.get('quant_method')!r}, not 'modelopt'", where)
        if (qc.get("producer") or {}).get("name") != "modelopt":
            r.add("config files", "producer.name is not 'modelopt'", where)
        if qc.get("kv_cache_scheme") is not None:
            r.add("config files", "kv_cache_scheme is set but no KV-cache scales are calibrated", where)
        return {"algo": qc.get("quant_algo"), "exclude": self._exclude_list(qc.get("ignore", []), "ignore", where)}

    def _exclude_list(self, value, key: str, where: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.report.add("config files", f"{key} is not a list of names", where)
            return []
        if not value:
            self.report.add("config files", f"{key} is empty (older SGLang refuses that)", where)
        return value

    def _check_config_groups(self, qc: dict) -> None:
        where = "config.json quantization_config"
        group = ((qc.get("config_groups") or {}).get("group_0")) or {}
        if group.get("weights") != FP4_SCHEME:
            self.report.add("config files", f"config_groups.group_0.weights is not {FP4_SCHEME}", where)
        activations = group.get("input_activations")
        if self.report.quant_algo == "NVFP4" and activations != FP4_SCHEME:
            self.report.add("config files", f"config_groups.group_0.input_activations is not {FP4_SCHEME}", where)
        if self.report.quant_algo == "W4A16_NVFP4" and activations is not None:
            self.report.add("config files", "W4A16_NVFP4 must not quantize input_activations", where)

    # -- index and shards ------------------------------------------------------------------------

    def check_index(self) -> None:
        r, check = self.report, "index"
        on_disk = sorted(p.name for p in self.out.glob("*.safetensors"))
        index_path = self.out / SAFETENSORS_INDEX
        if not index_path.is_file():
            if on_disk == [SINGLE_SHARD]:
                self._read_headers(on_disk)
                return
            r.add(check, f"{SAFETENSORS_INDEX} is missing", str(self.out))
            self._read_headers(on_disk)
            return
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            total_size = index.get("metadata", {}).get("total_size")
            assert isinstance(weight_map, dict) and all(isinstance(s, str) for s in weight_map.values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, AssertionError):
            r.add(check, "the index is not valid JSON with a weight_map", SAFETENSORS_INDEX)
            self._read_headers(on_disk)
            return
        named = sorted(set(weight_map.values()))
        for shard in named:
            if shard not in on_disk:
                count = sum(s == shard for s in weight_map.values())
                r.add(check, f"the index names shard {shard} ({count} tensors), which is missing", SAFETENSORS_INDEX)
        for shard in on_disk:
            if shard not in named:
                r.add(check, f"stray shard {shard} is not in the index (engines may load it twice)", shard)
        self._read_headers([s for s in named if s in on_disk])
        r.checked[check] = len(weight_map)
        for name, shard in sorted(weight_map.items()):
            if name not in self.tensors:
                if shard in on_disk:
                    r.add(check, f"the index puts {name} in {shard}, which does not hold it", SAFETENSORS_INDEX)
            elif self.tensors[name][0] != shard:
                r.add(check, f"the index puts {name} in {shard}, but it is in {self.tensors[name][0]}",
                      SAFETENSORS_INDEX)
        for name, (shard, _) in sorted(self.tensors.items()):
            if name not in weight_map:
                r.add(check, f"tensor {name} is not in the index", shard)
        actual = sum(info.nbytes for _, info in self.tensors.values())
        if total_size != actual and not any(v.check == check for v in r.violations):
            r.add(check, f"metadata.total_size is {total_size}, the tensors hold {actual} bytes", SAFETENSORS_INDEX)

    def _read_headers(self, shards: list[str]) -> None:
        for shard in shards:
            try:
                header = read_header(self.out / shard, filename=shard)
            except ConvertError as exc:
                self.report.add("index", exc.what, shard)
                continue
            self.headers[shard] = header
            for name, info in header.tensors.items():
                if name in self.tensors:
                    self.report.add("index", f"tensor {name} is in two shards ({self.tensors[name][0]})", shard)
                else:
                    self.tensors[name] = (shard, info)

    # -- per-tensor checks -----------------------------------------------------------------------

    def check_tensors(self) -> None:
        r = self.report
        for name, (_, info) in sorted(self.tensors.items()):
            if not name.endswith(".weight"):
                continue
            module = name[: -len(".weight")]
            if info.dtype == "U8":  # packed NVFP4 (the layout check reports a missing weight_scale)
                self.modules[module] = "nvfp4"
            elif len(info.shape) == 2:
                self.modules[module] = "kept"
        r.quantized = sorted(m for m, kind in self.modules.items() if kind == "nvfp4")
        for name in sorted(self.tensors):
            module = next((name[: -len(s)] for s in SCALE_SUFFIXES if name.endswith(s)), None)
            if module is not None and self.modules.get(module) != "nvfp4":
                r.add("tensor layout", "scale tensor for a module whose weight is not NVFP4 (U8)", name)
            if name.endswith((".k_scale", ".v_scale")):
                r.add("config files", "KV-cache scale present while kv_cache_quant_algo is null", name)
        quant_names = {m + s for m in r.quantized for s, _ in QUANTIZED_TENSORS}
        r.kept = sorted(n for n in self.tensors if n not in quant_names)
        total = sum(self.tensors[f"{m}.weight"][1].nbytes for m in r.quantized)
        with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not self.progress) as bar:
            for module in r.quantized:
                self._check_module(module)
                bar.update(self.tensors[f"{module}.weight"][1].nbytes)

    def _check_module(self, module: str) -> None:
        r = self.report
        weight = self.tensors[f"{module}.weight"][1]
        r.checked["tensor layout"] += 1
        if len(weight.shape) != 2:
            r.add("tensor layout", f"packed weight has shape {list(weight.shape)}, expected [N, K/2]",
                  f"{module}.weight")
            return
        n, half_k = weight.shape
        k = half_k * 2
        weight_only = self.report.quant_algo == "W4A16_NVFP4"
        expected = quantized_tensors(module, (n, k), weight_only=weight_only)[1:]  # the weight is checked above
        if weight_only and f"{module}{INPUT_SCALE}" in self.tensors:
            r.add("tensor layout", "input_scale present in a W4A16_NVFP4 checkpoint", f"{module}{INPUT_SCALE}")
        layout_ok = k % BLOCK == 0
        if not layout_ok:
            r.add("tensor layout", f"K = {k} is not a multiple of {BLOCK}", f"{module}.weight")
        for name, dtype, shape in expected:
            if name not in self.tensors:
                r.add("tensor layout", f"{name.rpartition('.')[2]} is missing", module)
                layout_ok = False
                continue
            info = self.tensors[name][1]
            if info.dtype != dtype or info.shape != shape:
                r.add("tensor layout", f"{name.rpartition('.')[2]} is {info.dtype}{list(info.shape)}, "
                      f"expected {dtype}{list(shape)}", name)
                layout_ok = False
            elif not shape:
                self._check_scalar(name)
        if layout_ok:
            self._scan_codes(module)
            self._scan_block_scales(module, n, k // BLOCK)

    def close_files(self) -> None:
        for f in self._fds.values():
            f.close()
        self._fds.clear()

    def read(self, name: str, start: int = 0, stop: int | None = None) -> bytearray:
        """Bytes ``[start, stop)`` of output tensor ``name``."""
        shard, _ = self.tensors[name]
        return read_tensor_bytes(self.out / shard, self.headers[shard], name, start, stop)

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of 2-D output tensor ``name``."""
        shard, _ = self.tensors[name]
        return read_rows(self.out / shard, self.headers[shard], name, r0, r1)

    def _check_scalar(self, name: str) -> None:
        self.report.checked["scalars"] += 1
        shard, info = self.tensors[name]
        if shard not in self._fds:  # one open file per shard: a checkpoint holds ~10^5 scalars
            self._fds[shard] = open(self.out / shard, "rb")  # noqa: SIM115 - closed by close_files()
        f = self._fds[shard]
        f.seek(self.headers[shard].data_start + info.data_offsets[0])
        raw = f.read(4)
        self.scalars[name] = raw
        value = struct.unpack("<f", raw)[0] if len(raw) == 4 else math.nan
        if not math.isfinite(value) or value <= 0:
            self.report.add("scalars", f"{name.rpartition('.')[2]} is {value}, expected a positive finite number", name)
        elif value < GLOBAL_SCALE_MIN:  # engines take its reciprocal, which would be inf
            self.report.add("scalars", f"{name.rpartition('.')[2]} is {value}, below the smallest normal float32", name)

    def _scan_codes(self, module: str) -> None:
        name = f"{module}.weight"
        size = self.tensors[name][1].nbytes
        counts = torch.zeros(16, dtype=torch.int64)
        for start in range(0, size, CHUNK_BYTES):
            packed = torch.frombuffer(self.read(name, start, min(size, start + CHUNK_BYTES)), dtype=torch.uint8)
            counts += torch.bincount(unpack_codes(packed).long(), minlength=16)
        self.report.code_counts = [a + b for a, b in zip(self.report.code_counts, counts.tolist())]

    def _scan_block_scales(self, module: str, rows: int, blocks: int) -> None:
        name = f"{module}.weight_scale"
        size = rows * blocks
        self.report.checked["block scales"] += 1
        problems: dict[str, list[int]] = {}  # kind -> [count, first flat index]
        counts = torch.zeros(256, dtype=torch.int64)
        for start in range(0, size, CHUNK_BYTES):
            raw = torch.frombuffer(self.read(name, start, min(size, start + CHUNK_BYTES)), dtype=torch.uint8)
            counts += torch.bincount(raw.long(), minlength=256)
            values = raw.view(torch.float8_e4m3fn).float()
            kinds = {
                "NaN": torch.isnan(values),
                "zero": values == 0,
                "negative": values < 0,
                "below 2^-9": (values > 0) & (values < SCALE_MIN),
                "above 448": values > E4M3_MAX,
            }
            for kind, mask in kinds.items():
                hits = mask.nonzero()
                if len(hits):
                    entry = problems.setdefault(kind, [0, start + int(hits[0])])
                    entry[0] += len(hits)
        self.report.scale_counts = [a + b for a, b in zip(self.report.scale_counts, counts.tolist())]
        for kind, (count, first) in problems.items():
            byte = self.read(name, first, first + 1)[0]
            self.report.add("block scales", f"{count} block scale(s) {kind} (first: byte 0x{byte:02X} at row "
                            f"{first // blocks}, block {first % blocks})", name)

    # -- cross-module checks ---------------------------------------------------------------------

    def check_groups(self) -> None:
        r = self.report
        try:  # the converter's fuse rules for this architecture
            self.recipe = load_recipe(config=self.config)
        except ConvertError as exc:
            r.add("fusion groups", f"cannot load the recipe for this model: {exc.what}", "config.json")
            return
        fused = fusion_groups(self.modules, self.recipe)
        in_group = {m for g in fused for m in g}
        r.groups = [g for g in fused if all(self.modules[m] == "nvfp4" for m in g)]
        r.groups += [(m,) for m in r.quantized if m not in in_group]
        for group in fused:
            kinds = {m: self.modules[m] for m in group}
            r.checked["fusion groups"] += 1
            if len(set(kinds.values())) > 1:
                quantized = [m for m, k in kinds.items() if k == "nvfp4"]
                kept = [m for m, k in kinds.items() if k != "nvfp4"]
                r.add("fusion groups", f"fused group is partly quantized ({', '.join(kept)} kept)",
                      ", ".join(quantized))
                continue
            if "kept" in kinds.values():
                continue
            for suffix in SCALAR_SUFFIXES:
                values = {m: self.scalars.get(f"{m}{suffix}") for m in group}
                if None in values.values():
                    continue  # missing or malformed, reported above
                if len(set(values.values())) > 1:
                    shown = ", ".join(f"{m.rpartition('.')[2]}={_f32(v):.6g}" for m, v in values.items())
                    r.add("fusion groups", f"fused modules have different {suffix[1:]}: {shown}",
                          group[0].rpartition(".")[0])

    def check_exclusions(self) -> None:
        r = self.report
        engine = set(r.quantized)
        if self.recipe is not None:  # fused names too, as engines see them (e.g. qkv_proj)
            engine.update(engine_names(dict.fromkeys(r.quantized), [g for g in r.groups if len(g) > 1], self.recipe))
        engine_sorted = sorted(engine)
        matcher = Matcher(self.exclude)
        hits: dict[str, str] = {}  # entry -> first quantized name it matches
        for m in engine_sorted:
            if matcher.matches(m):  # rare: only then is each entry tried
                for entry in self.exclude:
                    if entry not in hits and (m == entry or fnmatch.fnmatchcase(m, entry)):
                        hits[entry] = m
        clashes = substring_clashes([e for e in self.exclude if e not in hits], engine_sorted)
        for entry in self.exclude:
            r.checked["exclusions"] += 1
            if entry in hits:
                r.add("exclusions", f"{hits[entry]} is listed in exclude_modules ({entry!r}) but quantized",
                      "exclude_modules")
            elif entry in clashes:
                r.add("exclusions", f"exclusion {entry!r} is a substring of quantized {clashes[entry]}; vLLM would "
                      "skip it", "exclude_modules")
        for module, kind in sorted(self.modules.items()):
            if kind == "kept" and not matcher.matches(module):
                r.add("exclusions", f"{module} is not quantized but not in exclude_modules; engines would expect "
                      "NVFP4 tensors", "exclude_modules")

    def check_experts(self) -> None:
        layers: dict[str, set[str]] = {}
        for module, kind in self.modules.items():
            if m := EXPERT_MODULE.match(module):
                layers.setdefault(m["layer"], set()).add(kind)
        for layer, kinds in sorted(layers.items()):
            self.report.checked["MoE experts"] += 1
            if len(kinds) > 1:
                self.report.add("MoE experts", "experts of one MoE layer mix NVFP4 and unquantized weights", layer)


def _f32(raw: bytes) -> float:
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).item()
