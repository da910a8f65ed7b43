"""Block scales by least error: ``mse`` against ModelOpt 0.47's own MSE sweep, ``mse-weighted`` and its proxy.

The oracle is ModelOpt's code itself: its sweep kernel (``nvfp4_fp8_sweep._fp8_scale_sweep_kernel``, the
path its MSE calibration takes on a GPU) run by Triton's interpreter on the CPU, its candidates and its
static-quantizer export under :class:`CudaScalarDivision` (a division by a Python number is a
multiplication by the reciprocal on a GPU), and its ``NVFP4QTensor.quantize`` for the codes.
"""

from __future__ import annotations

import json

import pytest
import torch

from checks import load_all
from nvfp4_convert import convert
from nvfp4_convert.importance import FLOOR, DataFreeProxy, FixedChannelWeights, silu_square_mean
from nvfp4_convert.kernels import Backend, reference, search, selfcheck
from nvfp4_convert.kernels.common import dequantize, global_scale


@pytest.fixture(scope="module")
def modelopt_mse():
    pytest.importorskip("triton")
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt_mse import modelopt_mse

    return modelopt_mse


def test_reference_matches_modelopt_sweep_on_hard_tensors(modelopt_mse):
    from oracle_cases import cases

    every = cases(21)  # every kind once, dtypes rotating: normal, heavy, ties, zero/tiny blocks, huge, tiny
    picked = [every[i] for i in (1, 8, 9, 13, 17, 18)]
    amaxes = [reference.amax(w) * (1.5 if "normal" in name else 1.0) for name, w in picked]  # fused partners
    results = modelopt_mse([(w, a) for (_, w), a in zip(picked, amaxes)])
    differs_from_rtn = 0
    for (name, w), amax, (packed, scales, ws2) in zip(picked, amaxes, results):
        got_packed, got_scales = search.quantize(w, amax)
        assert torch.equal(got_scales.view(torch.uint8), scales), name
        assert torch.equal(got_packed, packed), name
        assert torch.equal(global_scale(amax), ws2), name
        differs_from_rtn += int((reference.quantize(w, ws2)[1].view(torch.uint8) != scales).sum())
    assert differs_from_rtn > 100  # the sweep really moves scales, so equality above is not rtn's


def test_mse_conversion_equals_modelopt_export_arithmetic(tiny, tmp_path, modelopt_mse):
    """Every quantized tensor of ``--scales mse`` is ModelOpt's MSE export of it, fused groups sharing one amax."""
    src = tiny("llama")
    convert(str(src), tmp_path / "out", scales="mse", max_shard_size="30KB", progress=False, log=lambda _: None)
    source, ours = load_all(src), load_all(tmp_path / "out")
    groups = {}
    for key in ours:
        if key.endswith(".weight_scale") and key.startswith("model.layers.0."):  # one layer: the oracle is slow
            module = key.removesuffix(".weight_scale")
            parent, _, leaf = module.rpartition(".")
            groups.setdefault((parent, {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu",
                                         "up_proj": "gu"}.get(leaf, leaf)), []).append(module)
    jobs = [(torch.cat([source[f"{m}.weight"] for m in members]),  # one sweep: one global amax
             max(source[f"{m}.weight"].abs().amax().float() for m in members)) for members in groups.values()]
    for members, (packed, scales, ws2) in zip(groups.values(), modelopt_mse(jobs)):
        row = 0
        for m in members:
            n = source[f"{m}.weight"].shape[0]
            assert torch.equal(ours[f"{m}.weight"], packed[row : row + n]), m
            assert torch.equal(ours[f"{m}.weight_scale"].view(torch.uint8), scales[row : row + n]), m
            assert torch.equal(ours[f"{m}.weight_scale_2"], ws2), m
            row += n


def test_weighted_search_with_unit_weights_is_mse_and_weights_move_scales():
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(24, 256, generator=g) * torch.exp(torch.randn(24, 1, generator=g))).to(torch.bfloat16)
    amax = reference.amax(w)
    plain = search.quantize(w, amax)
    ones = search.quantize(w, amax, torch.ones(256))
    assert torch.equal(plain[0], ones[0]) and torch.equal(plain[1].view(torch.uint8), ones[1].view(torch.uint8))
    h = torch.exp(3 * torch.randn(256, generator=g))
    weighted = search.quantize(w, amax, h)
    assert not torch.equal(weighted[1].view(torch.uint8), plain[1].view(torch.uint8))

    def err(q, weights):
        deq = dequantize(q[0], q[1], global_scale(amax))
        return ((deq - w.float()) ** 2 * weights).sum().item()

    assert err(weighted, h) < err(plain, h)  # each block's weighted error is minimal over all candidates
    assert err(plain, torch.ones(256)) <= err(weighted, torch.ones(256))
    assert err(plain, torch.ones(256)) < err(reference.quantize(w, global_scale(amax)), torch.ones(256))


def test_search_backends_are_proven_per_mode():
    def broken(weight, amax, h):
        packed, scales = search.quantize(weight, amax, h)
        scales = scales.view(torch.uint8).clone()
        scales.view(-1)[-1] ^= 1
        return packed, scales.view(torch.float8_e4m3fn)

    good = Backend(name="good", quantize=reference.quantize, amax=reference.amax, search=search.quantize)
    for mode in ("mse", "mse-weighted"):
        assert selfcheck.prove_search(good, mode).exact
        with pytest.raises(selfcheck.BackendRefused, match="block scales differ"):
            bad = Backend(name="bad", quantize=reference.quantize, amax=reference.amax, search=broken)
            selfcheck.prove_search(bad, mode)
    with pytest.raises(selfcheck.BackendRefused, match="has no mse block-scale search"):
        selfcheck.prove_search(Backend(name="none", quantize=reference.quantize, amax=reference.amax), "mse")


def test_proxy_weights_follow_the_layer_structure():
    hidden, heads, kv, hd, inter = 32, 4, 2, 8, 48
    g = torch.Generator().manual_seed(0)
    t = {
        "m.layers.0.input_layernorm.weight": torch.rand(hidden, generator=g) + 0.5,
        "m.layers.0.post_attention_layernorm.weight": torch.rand(hidden, generator=g) + 0.5,
        "m.layers.0.self_attn.k_proj.weight": torch.randn(kv * hd, hidden, generator=g),
        "m.layers.0.self_attn.v_proj.weight": torch.randn(kv * hd, hidden, generator=g),
        "m.layers.0.mlp.gate_proj.weight": torch.randn(inter, hidden, generator=g),
        "m.layers.0.mlp.up_proj.weight": torch.randn(inter, hidden, generator=g),
    }
    t["m.layers.0.self_attn.k_proj.weight"][:, 3] /= 10  # read with small weights: a large input channel
    proxy = DataFreeProxy({"model_type": "llama", "hidden_size": hidden, "num_attention_heads": heads,
                           "num_key_value_heads": kv}, set(t) | {"m.layers.0.self_attn.o_proj.weight"})

    def rows(name):
        yield 0, t[name][:5]
        yield 5, t[name][5:]

    def mean1(x):
        return (x / x.mean()).clamp(min=1e-3).float()

    def columns(name):
        return t[f"m.layers.0.{name}.weight"].double().pow(2).sum(0)

    g1 = t["m.layers.0.input_layernorm.weight"].double() ** 2
    assert proxy.needs("m.layers.0.self_attn.k_proj") == ["m.layers.0.input_layernorm.weight",
                                                          "m.layers.0.self_attn.k_proj.weight"]
    k = proxy.weights("m.layers.0.self_attn.k_proj", rows)
    assert torch.allclose(k, mean1(g1 / columns("self_attn.k_proj") ** 2))
    assert k[3] > 1000 * k.median()
    assert torch.allclose(proxy.weights("m.layers.0.self_attn.v_proj", rows),
                          mean1(g1 / columns("self_attn.v_proj") ** 2))
    assert proxy.needs("m.layers.0.self_attn.o_proj") == ["m.layers.0.self_attn.v_proj.weight",
                                                          "m.layers.0.input_layernorm.weight"]
    v = (t["m.layers.0.self_attn.v_proj.weight"].double() ** 2 @ g1).view(kv, hd)
    want = mean1(torch.cat([v[0], v[0], v[1], v[1]]))  # heads 0,1 read kv head 0; heads 2,3 kv head 1
    assert torch.allclose(proxy.weights("m.layers.0.self_attn.o_proj", rows), want)
    g2 = t["m.layers.0.post_attention_layernorm.weight"].double() ** 2
    assert torch.allclose(proxy.weights("m.layers.0.mlp.up_proj", rows), mean1(g2 / columns("mlp.up_proj") ** 2))
    gate = t["m.layers.0.mlp.gate_proj.weight"].double() ** 2 @ g2
    up = t["m.layers.0.mlp.up_proj.weight"].double() ** 2 @ g2
    z = torch.randn(200_000, dtype=torch.float64, generator=g)
    mc = torch.stack([(torch.nn.functional.silu(z * s.sqrt()) ** 2).mean() for s in gate[:3]])
    assert torch.allclose(silu_square_mean(gate[:3]), mc, rtol=0.02)
    assert torch.allclose(proxy.weights("m.layers.0.mlp.down_proj", rows), mean1(silu_square_mean(gate) * up))
    assert proxy.order("m.layers.0.mlp.down_proj") > proxy.order("m.layers.0.mlp.up_proj")
    assert proxy.weights("m.layers.0.mlp.experts_router", rows) is None


def test_proxy_column_energies_dead_and_tiny_columns_gemma_norms():
    """An all-zero input column gets the floor weight, a nearly dead one's energy is floored at FLOOR x the
    mean; Gemma-style norms weigh by (1 + g)^2."""
    g = torch.Generator().manual_seed(2)
    norm = torch.rand(32, generator=g) - 0.5
    w = torch.randn(8, 32, generator=g)
    w[:, 5] = 0
    w[:, 9] *= 1e-4
    t = {"m.layers.0.post_attention_layernorm.weight": norm, "m.layers.0.mlp.experts.1.gate_proj.weight": w}
    proxy = DataFreeProxy({"model_type": "gemma2", "hidden_size": 32}, set(t))
    h = proxy.weights("m.layers.0.mlp.experts.1.gate_proj", lambda name: iter([(0, t[name])]))
    c = w.double().pow(2).sum(0)
    want = (1 + norm.double()) ** 2 / c.clamp(min=1e-3 * c.mean()) ** 2
    want[5] = 0
    assert h[5] == FLOOR and torch.isfinite(h).all()
    assert torch.allclose(h, (want / want.mean()).clamp(min=FLOOR).float())


def test_weighted_conversion_uses_the_proxy_across_shards_and_resumes(tiny, tmp_path):
    """The output equals a direct recomputation with the proxy, with small shards so a layer's o/down and
    the v/gate/up/norms they read sit in different shards; a resumed run ends byte-identical."""
    src = tiny("llama")
    out = tmp_path / "out"
    convert(str(src), out, scales="mse-weighted", max_shard_size="30KB", progress=False, log=lambda _: None)
    source, ours = load_all(src), load_all(out)
    config = json.loads((src / "config.json").read_text())
    proxy = DataFreeProxy(config, set(source))

    def rows(name):
        yield 0, source[name]

    for layer in range(2):
        for group in (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)):
            kind = "self_attn" if group[0][0] in "qkvo" else "mlp"
            members = [f"model.layers.{layer}.{kind}.{p}" for p in group]
            amax = max(source[f"{m}.weight"].abs().amax().float() for m in members)
            for m in members:
                h = proxy.weights(m, rows)
                assert h is not None, m
                packed, scales = search.quantize(source[f"{m}.weight"], amax, h)
                assert torch.equal(ours[f"{m}.weight_scale"].view(torch.uint8), scales.view(torch.uint8)), m
                assert torch.equal(ours[f"{m}.weight"], packed), m
    shards = sorted(out.glob("model-*.safetensors"))
    before = {p.name: p.read_bytes() for p in shards}
    # damage the shards holding layer 1's o_proj and down_proj: a re-run redoes just those, reading what
    # their weights need from the source again
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    redo = {index["model.layers.1.self_attn.o_proj.weight"], index["model.layers.1.mlp.down_proj.weight"]}
    read = {index[f"model.layers.1.{t}.weight"] for t in ("self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
                                                          "input_layernorm", "post_attention_layernorm")}
    assert read - redo  # some of what they read comes from shards that stay finished
    for name in redo:
        (out / name).write_bytes((out / name).read_bytes()[:-1] + b"\x00")
    report = convert(str(src), out, scales="mse-weighted", max_shard_size="30KB", progress=False, log=lambda _: None)
    assert redo.isdisjoint(report.skipped_shards) and len(report.skipped_shards) == len(shards) - len(redo)
    assert {p.name: p.read_bytes() for p in sorted(out.glob("model-*.safetensors"))} == before


def test_fixed_channel_weights_reach_the_search(tiny, tmp_path):
    src = tiny("llama")
    source = load_all(src)
    module = "model.layers.0.mlp.down_proj"
    h = torch.exp(2 * torch.randn(source[f"{module}.weight"].shape[1], generator=torch.Generator().manual_seed(1)))
    convert(str(src), tmp_path / "out", scales="mse-weighted", channel_weights=FixedChannelWeights({module: h}),
            progress=False, log=lambda _: None)
    ours = load_all(tmp_path / "out")
    amax = source[f"{module}.weight"].abs().amax().float()
    want = search.quantize(source[f"{module}.weight"], amax, FixedChannelWeights({module: h}).table[module])
    assert torch.equal(ours[f"{module}.weight_scale"].view(torch.uint8), want[1].view(torch.uint8))
    other = "model.layers.0.self_attn.o_proj"  # not in the table: plain mse
    want = search.quantize(source[f"{other}.weight"], source[f"{other}.weight"].abs().amax().float())
    assert torch.equal(ours[f"{other}.weight_scale"].view(torch.uint8), want[1].view(torch.uint8))


def test_cpu_search_is_bit_exact_and_proven():
    from nvfp4_convert.kernels import cpu

    if cpu.available() is not None:
        pytest.skip(cpu.available())
    backend = cpu.BACKENDS[0]
    for mode in ("mse", "mse-weighted"):
        assert selfcheck.prove_search(backend, mode).exact
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(200, 320, generator=g) * torch.exp(torch.randn(200, 1, generator=g))).to(torch.float16)
    h = torch.exp(2 * torch.randn(320, generator=g))
    amax = reference.amax(w) * 1.3
    cpu.set_threads(2)
    try:
        for weights in (None, h):
            got, want = cpu.search(w, amax, weights), search.quantize(w, amax, weights)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1].view(torch.uint8), want[1].view(torch.uint8))
    finally:
        cpu.set_threads(None)


def test_verify_reports_each_layers_gain_over_rtn(tiny, tmp_path):
    from nvfp4_convert.verify import verify
    from nvfp4_convert.verify.summary import format_summary

    src = tiny("llama")
    for mode in ("rtn", "mse-weighted"):
        convert(str(src), tmp_path / mode, scales=mode, progress=False, log=lambda _: None)
    rtn = verify(tmp_path / "rtn", source=str(src), progress=False)
    assert rtn.ok and all(x.gain_vs_rtn == 0 for x in rtn.layers)
    assert "vs rtn" not in format_summary(rtn)
    weighted = verify(tmp_path / "mse-weighted", source=str(src), json_path=tmp_path / "r.json", progress=False)
    assert weighted.ok
    gains = [x.gain_vs_rtn for x in weighted.layers]
    assert len(gains) == 14 and sorted(gains)[7] > 0.0 and max(gains) < 1.0  # weighted trades plain error for its own
    assert "vs rtn:" in format_summary(weighted)
    assert "gain_vs_rtn" in json.loads((tmp_path / "r.json").read_text())["layers"][0]


def test_triton_search_is_bit_exact_under_the_interpreter():
    """The Triton search kernel, run by Triton's interpreter, against the reference on hard blocks."""
    pytest.importorskip("triton")
    from triton_search_interpreted import interpreted_search, search_jobs

    jobs = search_jobs(rows=2)
    moved = 0
    for (w, amax, h), (packed, scales) in zip(jobs, interpreted_search(jobs)):
        want_packed, want_scales = search.quantize(w, amax, h)
        where = f"{w.dtype}, amax {amax.item():g}, {'weighted' if h is not None else 'mse'}"
        assert torch.equal(scales, want_scales.view(torch.uint8)), where
        assert torch.equal(packed, want_packed), where
        moved += int((scales != reference.quantize(w, global_scale(amax))[1].view(torch.uint8)).sum())
    assert moved > 20  # the search really moves scales away from rtn's
