"""Check an NVFP4 output folder against the ModelOpt format contract, and optionally against its source.

Structural checks need only the output: both config files, the index, every quantized Linear's
tensors, block-scale bytes, shared scales of fused groups, exclusions and MoE expert formats. With a
source, every quantized weight is dequantized and compared with the original (SQNR, relative RMS,
and each code against a fresh rounding of the source value), and every kept tensor must be
byte-identical. Tensors are read one row chunk at a time and source shards are acquired one at a time.
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .compare import LayerError, compare_with_source, sqnr_stats
from .configs import FP4_SCHEME, GROUP_SIZE
from .errors import ConvertError
from .kernels.common import BLOCK, E4M3_MAX, GLOBAL_SCALE_MIN, SCALE_MIN
from .output import write_json_atomic
from .plan import EXPERT_MODULE, engine_names, fusion_groups
from .recipes import load_recipe
from .safetensors_io import ShardHeader, TensorInfo, read_header, read_rows, read_tensor_bytes
from .sources.base import SAFETENSORS_INDEX, SINGLE_SHARD

CHUNK_BYTES = 64 * 1024 * 1024  # raw bytes read at a time
QUANT_ALGOS = ("NVFP4", "W4A16_NVFP4")
_SCALARS = (".weight_scale_2", ".input_scale")
_SCALE_SUFFIXES = (".weight_scale", *_SCALARS)
CHECKS = ("config files", "index", "tensor layout", "scalars", "block scales", "fusion groups", "exclusions",
          "MoE experts", "error vs source", "kept vs source")


@dataclass(frozen=True)
class Violation:
    """One broken invariant: which check, what is wrong, and where."""

    check: str
    what: str
    where: str

    def line(self) -> str:
        return f"{self.what} ({self.where})"


@dataclass
class VerifyReport:
    """What :func:`verify` checked and found."""

    output: Path
    source: str | None = None
    quant_algo: str | None = None
    checked: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHECKS, 0))
    violations: list[Violation] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    groups: list[tuple[str, ...]] = field(default_factory=list)
    layers: list[LayerError] = field(default_factory=list)
    identical: int = 0  # kept tensors byte-identical to the source
    code_counts: list[int] = field(default_factory=lambda: [0] * 16)  # E2M1 codes 0..15 over all weights
    scale_counts: list[int] = field(default_factory=lambda: [0] * 256)  # block scales by E4M3 byte
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, check: str, what: str, where: str) -> None:
        self.violations.append(Violation(check, what, where))

    def sqnr_stats(self) -> tuple[float, float] | None:
        """``(median, min)`` SQNR in dB over compared layers, or None without a source comparison."""
        return sqnr_stats(self.layers)

    def format_summary(self) -> str:
        """The table printed at the end of ``nvfp4-convert verify``."""
        failed = {c: sum(v.check == c for v in self.violations) for c in CHECKS}
        width = max(len(c) for c in CHECKS)
        lines = [f"{'check':<{width}}  {'checked':>7}  result"]
        for check in CHECKS:
            if check in ("error vs source", "kept vs source") and self.source is None:
                continue
            result = f"FAIL ({failed[check]})" if failed[check] else "ok"
            lines.append(f"{check:<{width}}  {self.checked[check]:>7}  {result}")
        lines += ["", f"output:     {self.output}", f"format:     {self.quant_algo or '?'}; "
                  f"{len(self.quantized)} quantized Linear weights in {len(self.groups)} scale groups, "
                  f"{len(self.kept)} tensors kept"]
        if self.source is not None:
            lines.append(f"source:     {self.source}")
            if stats := self.sqnr_stats():
                measured = [x for x in self.layers if not math.isnan(x.sqnr_db)]
                worst = min(measured, key=lambda x: x.sqnr_db)
                lines.append(f"SQNR:       median {stats[0]:.1f} dB, min {stats[1]:.1f} dB ({worst.module}); "
                             f"max relative RMS error {max(x.rel_rms for x in measured):.4f}")
            lines.append(f"kept:       {self.identical} of {len(self.kept)} tensors byte-identical to the source")
        verdict = "PASS" if self.ok else f"FAIL: {len(self.violations)} violation(s)"
        lines += [f"verdict:    {verdict} ({self.seconds:.1f} s)"]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain data for ``--json`` (non-finite numbers become null)."""

        def num(x: float) -> float | None:
            return round(x, 6) if math.isfinite(x) else None

        stats = self.sqnr_stats()
        return {
            "ok": self.ok,
            "output": str(self.output),
            "source": self.source,
            "quant_algo": self.quant_algo,
            "checks": [{"name": c, "checked": self.checked[c], "violations": sum(v.check == c for v in self.violations)}
                       for c in CHECKS],
            "violations": [{"check": v.check, "what": v.what, "where": v.where} for v in self.violations],
            "quantized_modules": len(self.quantized),
            "kept_tensors": len(self.kept),
            "fusion_groups": [list(g) for g in self.groups if len(g) > 1],
            "sqnr_db": {"median": num(stats[0]), "min": num(stats[1])} if stats else None,
            "kept_identical": self.identical if self.source is not None else None,
            "layers": [{"module": x.module, "shape": list(x.shape), "sqnr_db": num(x.sqnr_db),
                        "rel_rms": num(x.rel_rms), "max_code_distance": x.max_code_distance, "outlier": x.outlier}
                       for x in self.layers],
            "e2m1_code_counts": self.code_counts,
            "block_scale_byte_counts": self.scale_counts,
            "seconds": round(self.seconds, 3),
        }


def verify(out: Path, *, source: str | None = None, revision: str | None = None, token: str | None = None,
           endpoint: str | None = None, json_path: Path | None = None, plot_dir: Path | None = None,
           progress: bool = True) -> VerifyReport:
    """Check the NVFP4 checkpoint in ``out``; optionally compare it with its source.

    Args:
        out: the converted checkpoint folder.
        source: the checkpoint it was converted from (local folder or Hub repo id); enables the error
            measurement and the byte-identity check of kept tensors.
        revision: Hub revision of ``source``.
        token: Hub token for a gated or private ``source`` (never recorded).
        endpoint: Hub endpoint URL.
        json_path: also write the report as JSON here.
        plot_dir: also write PNG plots here (needs matplotlib: ``pip install 'nvfp4-convert[plot]'``).
        progress: show a progress bar.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is False when any invariant is broken.

    Raises:
        ConvertError: when ``out`` is not a folder, the source cannot be read, or plotting is asked
            for without matplotlib.
    """
    started = time.perf_counter()
    out = Path(out)
    if not out.is_dir():
        raise ConvertError("output folder not found", where=str(out), fix="Give the folder a conversion wrote")
    if plot_dir is not None:
        from .plots import require_matplotlib

        require_matplotlib()
    checker = _Checker(out, progress=progress)
    checker.run()
    report = checker.report
    if source is not None:
        found = compare_with_source(checker, quantized=report.quantized, src=source, revision=revision, token=token,
                                    endpoint=endpoint, progress=progress)
        report.source, report.layers, report.identical = found.source, found.layers, found.identical
        report.checked["error vs source"], report.checked["kept vs source"] = len(found.layers), found.kept_compared
        for check, what, where in found.problems:
            report.add(check, what, where)
    report.seconds = time.perf_counter() - started
    if json_path is not None:
        write_json_atomic(Path(json_path), report.to_dict())
    if plot_dir is not None:
        from .plots import save_plots

        save_plots(report, Path(plot_dir))
    return report


class _Checker:
    """The structural checks, in order; later ones skip what earlier ones found broken.

    It also serves the output's tensors to :func:`~nvfp4_convert.compare.compare_with_source`.
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

    def run(self) -> None:
        self.check_configs()
        self.check_index()
        self.check_tensors()
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

    def check_configs(self) -> None:
        """Both config files present, in ModelOpt's shapes, and saying the same thing (spec §5)."""
        r = self.report
        r.checked["config files"] = 2
        self.config = self._json("config.json") or {}
        hqc = self._json("hf_quant_config.json")
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
        if quant.get("group_size", GROUP_SIZE) != GROUP_SIZE:
            r.add("config files", f"group_size is {quant.get('group_size')!r}, not {GROUP_SIZE}", where)
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
            assert isinstance(weight_map, dict)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
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
            module = next((name[: -len(s)] for s in _SCALE_SUFFIXES if name.endswith(s)), None)
            if module is not None and self.modules.get(module) != "nvfp4":
                r.add("tensor layout", "scale tensor for a module whose weight is not NVFP4 (U8)", name)
            if name.endswith((".k_scale", ".v_scale")):
                r.add("config files", "KV-cache scale present while kv_cache_quant_algo is null", name)
        quant_names = {f"{m}{s}" for m in r.quantized for s in (".weight", *_SCALE_SUFFIXES)}
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
        expected = {".weight_scale": ("F8_E4M3", (n, k // BLOCK)), ".weight_scale_2": ("F32", ())}
        if self.report.quant_algo != "W4A16_NVFP4":
            expected[".input_scale"] = ("F32", ())
        elif f"{module}.input_scale" in self.tensors:
            r.add("tensor layout", "input_scale present in a W4A16_NVFP4 checkpoint", f"{module}.input_scale")
        layout_ok = k % GROUP_SIZE == 0
        if not layout_ok:
            r.add("tensor layout", f"K = {k} is not a multiple of {GROUP_SIZE}", f"{module}.weight")
        for suffix, (dtype, shape) in expected.items():
            name = f"{module}{suffix}"
            if name not in self.tensors:
                r.add("tensor layout", f"{suffix[1:]} is missing", module)
                layout_ok = False
                continue
            info = self.tensors[name][1]
            if info.dtype != dtype or info.shape != shape:
                r.add("tensor layout", f"{suffix[1:]} is {info.dtype}{list(info.shape)}, expected {dtype}{list(shape)}",
                      name)
                layout_ok = False
            elif not shape:
                self._check_scalar(name)
        if layout_ok:
            self._scan_codes(module)
            self._scan_block_scales(module, n, k // BLOCK)

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
        raw = bytes(self.read(name))
        self.scalars[name] = raw
        value = torch.frombuffer(bytearray(raw), dtype=torch.float32).item()
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
            for nibbles in (packed & 0x0F, packed >> 4):
                counts += torch.bincount(nibbles.long(), minlength=16)
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
            for suffix in _SCALARS:
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
        for entry in self.exclude:
            r.checked["exclusions"] += 1
            hit = next((m for m in sorted(engine) if m == entry or fnmatch.fnmatchcase(m, entry)), None)
            if hit is not None:
                r.add("exclusions", f"{hit} is listed in exclude_modules ({entry!r}) but quantized", "exclude_modules")
                continue
            clash = next((m for m in sorted(engine) if "*" not in entry and entry in m), None)
            if clash is not None:
                r.add("exclusions", f"exclusion {entry!r} is a substring of quantized {clash}; vLLM would skip it",
                      "exclude_modules")
        for module, kind in sorted(self.modules.items()):
            if kind == "kept" and not any(module == e or fnmatch.fnmatchcase(module, e) for e in self.exclude):
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
