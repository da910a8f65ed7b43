"""CUDA backends against the reference, the self-check on real no-op kernels, scale layouts against
FlashInfer, and the custom op under torch.compile / CUDA graphs. Skipped without a CUDA GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from nvfp4_convert import kernels
from nvfp4_convert.kernels import Backend, reference, triton_kernel
from nvfp4_convert.kernels.common import BLOCK, dequantize, global_scale
from nvfp4_convert.kernels.layouts import swizzle_8x4, swizzle_128x4, unswizzle_128x4
from nvfp4_convert.kernels.selfcheck import BackendRefused, prove

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA_BACKENDS = ["triton", "flashinfer-cuda", "flashinfer-cute-dsl"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1, 16), (7, 48), (129, 32), (128, 4096), (1000, 1040), (4096, 4096), (3, 65536)]
HAVE_FLASHINFER = importlib.util.find_spec("flashinfer") is not None


def _weight(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal weights with per-row magnitudes over six decades, a zero block and a -0.0 block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * torch.logspace(-3, 3, rows)[torch.randperm(rows, generator=g)][:, None]
    w[0, :BLOCK] = 0.0
    if rows > 1:
        w[1, :BLOCK] = -0.0
    return w.clamp(-6e4, 6e4).to(dtype)


def _assert_same(got, want):
    assert torch.equal(got[0].cpu(), want[0]), f"packed differ at {(got[0].cpu() != want[0]).sum().item()} bytes"
    assert torch.equal(got[1].cpu().view(torch.uint8), want[1].view(torch.uint8)), "scales differ"


@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_available_backends_pass_the_self_check(name):
    backend = kernels.get_backend(name)
    why_not = backend.available()
    if why_not:
        pytest.skip(why_not)
    proof = prove(backend)
    assert proof.exact == backend.exact


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_matches_reference(shape, dtype):
    w = _weight(*shape, dtype, seed=shape[0] * 7 + shape[1])
    ws2 = global_scale(reference.amax(w))
    want = reference.quantize(w, ws2)
    _assert_same(triton_kernel.quantize(w, ws2), want)
    packed, scales, got_ws2 = triton_kernel.quantize_device(w.cuda())  # fused amax, no host sync
    assert got_ws2.item() == ws2.item()
    _assert_same((packed, scales), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_amax_and_global_scale(dtype):
    w = _weight(333, 4112, dtype, seed=3)
    assert triton_kernel.amax_device(w.cuda()).item() == reference.amax(w).item()
    _, _, ws2 = triton_kernel.quantize_device(torch.zeros(4, 64, dtype=dtype, device="cuda"))
    assert ws2.item() == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("amax", [1e-45, 1e-44, 1e-40, 2e-38, 1e-36, 3e-35])
def test_triton_denormal_dust_matches_reference(dtype, amax):
    """Tensors whose global scale is floored at 2^-126: the same global scale and bytes as the reference."""
    g = torch.Generator().manual_seed(5)
    w = ((torch.rand(64, 256, generator=g) * 2 - 1) * amax).to(dtype)
    ws2 = global_scale(reference.amax(w))
    want = reference.quantize(w, ws2)
    _assert_same(triton_kernel.quantize(w.cuda(), ws2), want)
    packed, scales, got_ws2 = triton_kernel.quantize_device(w.cuda())
    assert got_ws2.item() == ws2.item()
    _assert_same((packed, scales), want)


def test_triton_kernel_variants_agree_on_many_values(monkeypatch):
    """Packed compares vs FMA-corrected reciprocal vs tl.div_rn, hardware vs software E4M3 rounding, one
    program per SM (long persistent loops): the same bytes on 64M values."""
    g = torch.Generator(device="cuda").manual_seed(5)
    w = torch.randn(8192, 8192, device="cuda", generator=g) * torch.rand(8192, 1, device="cuda", generator=g).pow(4)
    w[::97] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 1024, device="cuda")  # ties: ws2 = 1
    w = w.to(torch.bfloat16)
    outs = []
    division = {"simd16": False}
    for variant in ({}, {**division, "exact_div": True}, {**division, "hw_fp8": False}, division,
                    {"programs_per_sm": 1}):
        with monkeypatch.context() as m:
            for key, value in variant.items():
                m.setitem(triton_kernel.CONFIG, key, value)
            outs.append(triton_kernel.quantize_device(w, ws2=torch.ones((), device="cuda")))
    for other in outs[1:]:
        assert torch.equal(outs[0][0], other[0])
        assert torch.equal(outs[0][1].view(torch.uint8), other[1].view(torch.uint8))
    rows = slice(0, 8192, 61)  # spot-check against the reference
    _assert_same((outs[0][0][rows], outs[0][1][rows]), reference.quantize(w[rows].cpu(), outs[0][2].cpu()))


@pytest.fixture(params=["simd16", "division"])
def triton_path(request, monkeypatch):
    """Run with the packed 16-bit compare path (SM90+), then with the division path it replaces."""
    monkeypatch.setitem(triton_kernel.CONFIG, "simd16", request.param == "simd16")
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("ws2", [None, 1.0, 2.0**-12, 1e-30, 2.0**90], ids=["amax", "1", "saturating", "tiny", "huge"])
def test_triton_every_finite_bit_pattern(dtype, ws2, triton_path):
    """Every finite value of the dtype, against its own amax and against global scales that saturate
    (quotients overflow float32), that take the exact-division path, or that round everything to zero."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[torch.isfinite(values)]
    values = values[: values.numel() // 256 * 256]
    shuffled = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(1))]
    w = torch.cat([values, shuffled]).view(-1, 256)  # neighbours in a block, then blocks of every magnitude
    given = None if ws2 is None else torch.tensor(ws2, device="cuda")
    packed, scales, got_ws2 = triton_kernel.quantize_device(w.cuda(), ws2=given)
    want_ws2 = global_scale(reference.amax(w)) if ws2 is None else torch.tensor(ws2)
    assert got_ws2.item() == want_ws2.item()
    _assert_same((packed, scales), reference.quantize(w, want_ws2))


def test_triton_strided_rows_and_second_view():
    base = _weight(64, 1024, torch.bfloat16, seed=9)
    view = base.cuda()[:, 256:768]  # rows 1024 apart, K = 512
    ws2 = global_scale(reference.amax(view.cpu()))
    _assert_same(triton_kernel.quantize_device(view, ws2=ws2.cuda())[:2],
                 reference.quantize(view.cpu().contiguous(), ws2))


def _noop_cuda(w, ws2):
    rows, k = w.shape
    packed = torch.empty(rows, k // 2, dtype=torch.uint8, device="cuda")
    scales = torch.empty(rows, k // BLOCK, dtype=torch.uint8, device="cuda")
    return packed.cpu(), scales.view(torch.float8_e4m3fn).cpu()


def test_synthetic_noop_cuda_backend_is_refused():
    noop = Backend(name="noop", quantize=_noop_cuda, amax=reference.amax, exact=True, device="cuda")
    with pytest.raises(BackendRefused, match="outputs left untouched"):
        prove(noop)


@pytest.mark.skipif(not HAVE_FLASHINFER, reason="flashinfer is not installed")
def test_flashinfer_cuda_below_sm100_is_unavailable_and_refused():
    if torch.cuda.get_device_capability() >= (10, 0):
        pytest.skip("FlashInfer's FP4 kernels run on this GPU")
    backend = kernels.get_backend("flashinfer-cuda")
    assert "silent no-op" in backend.available()
    with pytest.raises(BackendRefused, match="outputs left untouched: backend did not write its output buffers"):
        prove(backend)


@pytest.mark.skipif(not HAVE_FLASHINFER, reason="flashinfer is not installed")
@pytest.mark.parametrize("shape", [(1, 1), (129, 5), (256, 64), (300, 7), (4, 129, 6)], ids=str)
def test_swizzle_128x4_equals_flashinfer_block_scale_interleave(shape):
    import flashinfer

    g = torch.Generator().manual_seed(sum(shape))
    sf = torch.randint(1, 0x7F, shape, generator=g, dtype=torch.uint8).cuda()
    ours = swizzle_128x4(sf)
    assert torch.equal(flashinfer.block_scale_interleave(sf).reshape(-1), ours.reshape(-1))
    assert torch.equal(unswizzle_128x4(ours, rows=shape[-2], cols=shape[-1]), sf)


@pytest.mark.skipif(not HAVE_FLASHINFER, reason="flashinfer is not installed")
@pytest.mark.parametrize("layout", ["linear", "128x4", "8x4"])
def test_packing_and_layouts_dequantize_like_flashinfer(layout):
    """FlashInfer's host dequantizer reads our codes and our (swizzled) scales to the same values."""
    import flashinfer

    w = _weight(133, 336, torch.bfloat16, seed=11).cuda()
    packed, scales, ws2 = triton_kernel.quantize_device(w)
    sf = {"linear": scales, "128x4": swizzle_128x4(scales), "8x4": swizzle_8x4(scales)}[layout]
    got = flashinfer.e2m1_and_ufp8sf_scale_to_float(
        packed.cpu(), sf.view(torch.uint8).reshape(-1).cpu(), ws2.reshape(1).cpu(), 16, 1,
        layout != "linear", layout == "8x4",
    )
    assert torch.equal(got, dequantize(packed.cpu(), scales.cpu(), ws2.cpu()))


def test_custom_op_fake_and_schema():
    w = _weight(64, 256, torch.bfloat16, seed=13).cuda()
    torch.library.opcheck(torch.ops.nvfp4_convert.quantize.default, (w, None),
                          test_utils=("test_schema", "test_faketensor"))
    ws2 = global_scale(reference.amax(w.cpu())).cuda()
    torch.library.opcheck(torch.ops.nvfp4_convert.quantize.default, (w, ws2),
                          test_utils=("test_schema", "test_faketensor"))


def test_custom_op_under_torch_compile_fullgraph():
    w = _weight(256, 1024, torch.bfloat16, seed=17).cuda()

    @torch.compile(fullgraph=True)
    def quantize_scaled(x):
        packed, scales, ws2 = torch.ops.nvfp4_convert.quantize(x * 2)
        return packed, scales, ws2 * 1

    got = quantize_scaled(w)
    want = triton_kernel.quantize_device(w * 2)
    _assert_same(got[:2], (want[0].cpu(), want[1].cpu()))
    assert got[2].item() == want[2].item()


def test_custom_op_in_a_cuda_graph():
    static = _weight(512, 2048, torch.bfloat16, seed=19).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        triton_kernel.quantize_device(static)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_kernel.quantize_device(static)
    fresh = _weight(512, 2048, torch.bfloat16, seed=23).cuda()
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    want = reference.quantize(fresh.cpu(), global_scale(reference.amax(fresh.cpu())))
    _assert_same(out[:2], want)
    assert out[2].item() == global_scale(reference.amax(fresh.cpu())).item()


def _tiny_llama(src):
    """A two-layer Llama-shaped BF16 checkpoint in ``src`` with zero blocks, rows of spread magnitudes."""
    from safetensors.torch import save_file

    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(512, 256, generator=gen).to(torch.bfloat16)}
    for i in range(2):
        for name, shape in {"self_attn.q_proj": (256, 256), "self_attn.k_proj": (64, 256),
                            "self_attn.v_proj": (64, 256),
                            "self_attn.o_proj": (256, 256), "mlp.gate_proj": (704, 256), "mlp.up_proj": (704, 256),
                            "mlp.down_proj": (256, 704)}.items():
            w = torch.randn(*shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 0.05
            w[: shape[0] // 8, :16] = 0  # zero blocks
            tensors[f"model.layers.{i}.{name}.weight"] = w.to(torch.bfloat16)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def _assert_same_files(a, b):
    files = sorted(p.name for p in a.iterdir() if p.is_file())
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.gpu
def test_gpu_conversion_is_byte_identical_to_cpu(tmp_path):
    """End to end on the GPU (Triton) versus the CPU: same bytes in every file."""
    from nvfp4_convert import convert

    _tiny_llama(tmp_path / "src")
    src = tmp_path / "src"
    cpu = convert(str(src), tmp_path / "cpu", backend="reference", max_shard_size="300KB", progress=False)
    gpu = convert(str(src), tmp_path / "gpu", backend="triton", max_shard_size="300KB", progress=False)
    assert gpu.backend == "triton" and cpu.backend == "reference"
    _assert_same_files(tmp_path / "cpu", tmp_path / "gpu")


@pytest.mark.parametrize("scales", ["mse", "mse-weighted"])
def test_gpu_search_conversion_is_byte_identical_to_cpu(tmp_path, scales):
    """``--scales mse`` / ``mse-weighted`` with the Triton search versus the CPU backend: same bytes."""
    from nvfp4_convert import convert

    _tiny_llama(tmp_path / "src")
    src = tmp_path / "src"
    kw = dict(scales=scales, max_shard_size="300KB", progress=False, log=lambda _: None)
    on_cpu = "cpu" if kernels.get_backend("cpu").available() is None else "reference"
    cpu = convert(str(src), tmp_path / "cpu", backend=on_cpu, **kw)
    gpu = convert(str(src), tmp_path / "gpu", backend="triton", **kw)
    assert gpu.backend == "triton" and cpu.backend == on_cpu
    _assert_same_files(tmp_path / "cpu", tmp_path / "gpu")


@pytest.mark.parametrize("scales", ["mse", "mse-weighted"])
def test_triton_search_is_proven_and_chosen_for_the_search_modes(scales):
    from nvfp4_convert.kernels.selfcheck import prove_search, select_proven_backend

    triton_backend = kernels.get_backend("triton")
    assert prove_search(triton_backend, scales).exact
    chosen, reason = select_proven_backend(scales=scales)
    assert chosen.name == "triton", reason


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 16), (129, 1040), (256, 2048)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_search_matches_reference(shape, dtype):
    """Both modes, with a fused partner's larger amax, against the sweep reference, from CPU and GPU inputs."""
    from nvfp4_convert.kernels import search

    w = _weight(*shape, dtype, seed=shape[0] + shape[1])
    g = torch.Generator().manual_seed(shape[1])
    h = torch.exp(3 * torch.randn(shape[1], generator=g))
    amax = reference.amax(w) * 1.25
    for weights in (None, h):
        want = search.quantize(w, amax, weights)
        _assert_same(triton_kernel.search(w, amax, weights), want)
        _assert_same(triton_kernel.search_on_device(w.cuda(), amax, weights), want)


def test_triton_search_hard_blocks_and_kernel_shapes(monkeypatch):
    """Ties, zero/tiny blocks, losses that underflow or overflow (global scales 1e-30 .. 1e30), for each
    kernel shape: the same bytes as the reference."""
    from nvfp4_convert.kernels import search
    from triton_search_interpreted import search_jobs

    jobs = search_jobs(rows=300, magnitudes=(1e-30, 1e30))
    wants = [search.quantize(w, amax, h) for w, amax, h in jobs]
    for blocks, warps in ((64, 2), (32, 1), (128, 4)):
        with monkeypatch.context() as m:
            m.setitem(triton_kernel.CONFIG, "search_blocks", blocks)
            m.setitem(triton_kernel.CONFIG, "search_warps", warps)
            for (w, amax, h), want in zip(jobs, wants):
                _assert_same(triton_kernel.search(w.cuda(), amax, h), want)


def test_gpu_calibrated_hub_conversion_downloads_each_shard_once(tiny, fake_hub, tmp_path):
    """--calibrate from a Hub repo with calibration and quantization on the GPU: one GET per shard, and the
    bytes of the same GPU conversion from a folder."""
    import shutil

    from checks import snapshot
    from nvfp4_convert import convert
    from tiny_models import add_byte_tokenizer

    pytest.importorskip("transformers")
    src = add_byte_tokenizer(shutil.copytree(tiny("qwen3_moe"), tmp_path / "src"))
    (tmp_path / "calib.txt").write_text("Calibration text: ordinary prose, numbers like 1234 and 3.14159. " * 20)
    options = dict(calibrate=str(tmp_path / "calib.txt"), calib_samples=4, calib_seq_len=48, max_shard_size="30KB",
                   progress=False, log=lambda _: None)
    fake_hub.add_repo("org/tiny", src)
    local = convert(str(src), tmp_path / "local", **options)
    hub = convert("org/tiny", tmp_path / "hub", endpoint=fake_hub.url, work_dir=tmp_path / "work", **options)
    assert local.backend == hub.backend != "cpu"
    assert snapshot(tmp_path / "hub") == snapshot(tmp_path / "local")
    gets = [r.path for r in fake_hub.requests if r.method == "GET" and r.path.endswith(".safetensors") and not r.range]
    assert len(gets) == len(set(gets)) == len(list(src.glob("*.safetensors")))


def test_cuda_bench_times_graphs_and_relates_to_copy(tmp_path):
    from nvfp4_convert.bench import run_bench

    results = run_bench(device="cuda", backends=["triton"], shapes=[(512, 2048)], repeats=3, out=lambda _: None)
    rows = {r["backend"]: r for r in results}
    assert rows["triton"]["timing"] == "cuda-graph" and rows["reference"]["timing"] == "events"
    for r in rows.values():
        assert 0 < r["of_copy_bandwidth"] < r["of_copy_bandwidth_moved"]
    assert rows["triton"]["speedup_vs_reference"] > 1


def test_cuda_scales_bench_reports_the_search_cost():
    from nvfp4_convert.bench import run_scales_bench

    lines = []
    (row,) = run_scales_bench(device="cuda", backends=["triton"], shapes=[(512, 2048)], repeats=3, out=lines.append)
    assert row["rtn_s"] > 0 and row["mse_vs_rtn"] > 0 and row["mse-weighted_vs_rtn"] > 0
    assert lines[-1].startswith("triton ")


def _modelopt_cuda_results() -> dict:
    """ModelOpt 0.47 on this GPU for every ``oracle_cases`` tensor: run here, or saved by
    ``python tests/oracle_cases.py FILE`` where ModelOpt is installed and named by ``NVFP4_MODELOPT_CUDA``."""
    import os

    from oracle_cases import cases, load_results, modelopt_quantize

    saved = os.environ.get("NVFP4_MODELOPT_CUDA")
    if saved:
        return load_results(saved)
    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("needs nvidia-modelopt here, or NVFP4_MODELOPT_CUDA naming its saved CUDA results")
    return {name: tuple(t.cpu() for t in modelopt_quantize(w.cuda())) for name, w in cases()}


def test_every_backend_equals_modelopt_on_cuda():
    """weight_scale_2, block scales and codes of ModelOpt's GPU export, on every exact backend and device."""
    from nvfp4_convert.kernels import cpu
    from oracle_cases import cases

    results = _modelopt_cuda_results()
    ws2_not_quotient = 0
    for name, w in cases():
        packed, scales, ws2 = results[name]
        amax = reference.amax(w)
        ws2_not_quotient += bool(ws2 != amax / 2688.0)
        assert global_scale(amax).view(torch.int32) == ws2.view(torch.int32), name
        assert global_scale(amax.cuda()).cpu().view(torch.int32) == ws2.view(torch.int32), name
        got = {
            "reference-cpu": reference.quantize(w, global_scale(amax)),
            "reference-cuda": reference.quantize(w.cuda(), global_scale(amax.cuda())),
            "triton": triton_kernel.quantize(w, ws2),
        }
        if cpu.available() is None:
            got["cpu"] = cpu.quantize(w, global_scale(cpu.amax(w)))
        t_packed, t_scales, t_ws2 = triton_kernel.quantize_device(w.cuda())  # global scale inside the kernel
        got["triton-fused"] = (t_packed, t_scales)
        assert t_ws2.cpu().view(torch.int32) == ws2.view(torch.int32), name
        for backend, (p, s) in got.items():
            assert torch.equal(s.cpu().view(torch.uint8), scales), (backend, name)
            assert torch.equal(p.cpu(), packed), (backend, name)
    print(f"\nModelOpt on CUDA == reference (CPU, CUDA), cpu, triton, triton-fused on {len(results)} tensors; "
          f"weight_scale_2 differs from amax/2688 in {ws2_not_quotient}")
    assert len(results) >= 200 and ws2_not_quotient > 0
