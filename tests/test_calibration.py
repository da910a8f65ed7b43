"""Calibration: data loading, layer-by-layer statistics, input_scales against ModelOpt, resume, bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from checks import load_all, raw_bytes
from nvfp4_convert import convert
from nvfp4_convert.calibration.data import load_calibration_data, load_tokenizer
from nvfp4_convert.errors import ConvertError
from nvfp4_convert.kernels.common import global_scale
from nvfp4_convert.sources import open_source
from tiny_models import add_byte_tokenizer, expected_source, make_fp8

pytest.importorskip("transformers")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Calibration text is ordinary prose: sentences of "
    "different lengths, numbers like 1234 and 3.14159, punctuation (commas, colons; dashes) and a few "
    "rarer words such as quantization, activation and perplexity. " * 6
)
SAMPLES, SEQ_LEN = 4, 48


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def model(tiny, tmp_path):
    """A tiny checkpoint of ``kind`` with a byte-level tokenizer, in its own folder."""
    import shutil

    def make(kind: str):
        folder = tmp_path / f"src-{kind}"
        shutil.copytree(tiny(kind), folder)
        return add_byte_tokenizer(folder)

    return make


def _ids(src, data, **kwargs):
    source = open_source(str(src))
    return load_calibration_data(str(data), tokenizer=load_tokenizer(source, where="src"), **kwargs)


def _modelopt_input_amax(src, input_ids, dst):
    """ModelOpt 0.47: mtq.quantize(NVFP4_DEFAULT_CFG, forward_loop) + export on CPU; each module's input amax."""
    import transformers

    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_hf_checkpoint

    warnings.filterwarnings("ignore")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    export_hf_checkpoint(mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(input_ids)), export_dir=dst)
    scales = {n[: -len(".input_scale")]: t for n, t in load_all(dst).items() if n.endswith(".input_scale")}
    # On the CPU ModelOpt divides (amax / 2688); amax is a BF16 value, so it is recovered exactly.
    return {m: (s.double() * 2688).to(torch.bfloat16).float().reshape(()) for m, s in scales.items()}, scales


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_input_scales_match_modelopt(kind, model, text_file, tmp_path):
    src = model(kind)
    data = _ids(src, text_file, samples=SAMPLES, seq_len=SEQ_LEN)
    amax, theirs = _modelopt_input_amax(src, data.input_ids, tmp_path / "modelopt")
    convert(str(src), tmp_path / "ours", calibrate=str(text_file), calib_samples=SAMPLES, calib_seq_len=SEQ_LEN,
            max_shard_size="30KB", progress=False)
    ours = {n[: -len(".input_scale")]: t for n, t in load_all(tmp_path / "ours").items() if n.endswith(".input_scale")}
    assert sorted(ours) == sorted(theirs)
    assert len({a.item() for a in amax.values()}) > 3  # real, differing statistics
    for module, a in amax.items():
        # ModelOpt's amax exactly, through the shared GPU-export rule: byte for byte.
        assert raw_bytes(ours[module]) == raw_bytes(global_scale(a).reshape(())), module
        assert (theirs[module] - ours[module]).abs() <= ours[module] * 2**-23, module  # and ModelOpt's CPU value
    if kind == "qwen3_moe":  # every expert of a layer shares each projection's maximum, as in ModelOpt
        for layer in range(2):
            ups = {raw_bytes(ours[f"model.layers.{layer}.mlp.experts.{e}.{leaf}"]) for e in range(4)
                   for leaf in ("gate_proj", "up_proj")}
            assert len(ups) == 1


def test_unreached_experts_share_the_layer_maximum(model, text_file, tmp_path, monkeypatch):
    """An expert no token reaches gets its layer's maximum for that projection (ModelOpt's fallback)."""
    from nvfp4_convert.calibration import collect

    src = model("qwen3_moe")
    original = collect.Observer.record

    def skip_expert_0(self, modules, x, weight):
        original(self, [m for m in modules if ".experts.0." not in m[0]], x, weight)

    monkeypatch.setattr(collect.Observer, "record", skip_expert_0)
    lines = []
    convert(str(src), tmp_path / "out", calibrate=str(text_file), calib_samples=SAMPLES, calib_seq_len=SEQ_LEN,
            progress=False, log=lines.append)
    out = load_all(tmp_path / "out")
    assert any("experts got no token" in line for line in lines)
    for leaf in ("gate_proj", "down_proj"):
        values = {raw_bytes(out[f"model.layers.1.mlp.experts.{e}.{leaf}.input_scale"]) for e in range(4)}
        assert len(values) == 1, leaf
    assert out["model.layers.1.mlp.experts.0.down_proj.input_scale"].item() != 1.0


def test_resume_is_byte_identical(model, text_file, tmp_path, monkeypatch):
    from nvfp4_convert.calibration import collect, layers

    src = model("llama")
    options = {"calibrate": str(text_file), "calib_samples": SAMPLES, "calib_seq_len": SEQ_LEN,
               "max_shard_size": "30KB", "progress": False}
    convert(str(src), tmp_path / "whole", **options)

    monkeypatch.setattr(collect, "CHECKPOINT_SECONDS", 0.0)
    original, calls = layers.free, []

    def interrupt_after_first_layer(module):
        original(module)
        calls.append(module)
        if len(calls) == 3:  # the embedding, layer 0, then layer 1 before its statistics are saved
            raise KeyboardInterrupt

    monkeypatch.setattr(layers, "free", interrupt_after_first_layer)
    with pytest.raises(KeyboardInterrupt):
        convert(str(src), tmp_path / "resumed", **options)
    state = tmp_path / "resumed" / ".nvfp4-convert" / "calibration"
    assert (state / "layer-00000.safetensors").is_file() and (state / "hidden.safetensors").is_file()
    assert not (tmp_path / "resumed" / "config.json").exists()

    monkeypatch.setattr(layers, "free", original)
    ran, original_load = [], layers.load_into

    def recording_load(model, tensors, **kw):
        ran.append(sorted(tensors))
        original_load(model, tensors, **kw)

    monkeypatch.setattr(layers, "load_into", recording_load)
    convert(str(src), tmp_path / "resumed", **options)
    assert not any(name.startswith("model.layers.0.") for names in ran for name in names)  # layer 0 not rerun
    assert not (state / "hidden.safetensors").exists()
    whole, resumed = load_all(tmp_path / "whole"), load_all(tmp_path / "resumed")
    assert sorted(whole) == sorted(resumed)
    for name in whole:
        assert raw_bytes(whole[name]) == raw_bytes(resumed[name]), name


def test_calibration_in_card_info(model, text_file, tmp_path):
    from nvfp4_convert.output import read_conversion_info
    from nvfp4_convert.publish import _calibration_lines

    src = model("llama")
    report = convert(str(src), tmp_path / "out", calibrate=str(text_file), calib_samples=2, calib_seq_len=32,
                     progress=False)
    info = read_conversion_info(tmp_path / "out")
    assert info["calibration"] == report.calibration
    assert info["calibration"]["samples"] == 2 and info["calibration"]["seq_len"] == 32
    assert "calibrated" in info["activation_policy"]
    line = _calibration_lines(info["calibration"])[0]
    assert "2 samples x 32 tokens" in line and str(text_file) in line


# -- data --------------------------------------------------------------------------------------------


def test_jsonl_parquet_and_txt_give_the_same_tokens(model, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    src = model("llama")
    paragraphs = [p.strip() + "." for p in TEXT.split(".") if p.strip()]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": p, "n": i}) + "\n" for i, p in enumerate(paragraphs)))
    pq.write_table(pa.table({"body": paragraphs}), tmp_path / "a.parquet")
    a = _ids(src, tmp_path / "a.jsonl", samples=3, seq_len=40, column="body")
    b = _ids(src, tmp_path / "a.parquet", samples=3, seq_len=40, column="body")
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.shape == (3, 40)
    tok = load_tokenizer(open_source(str(src)), where="src")
    assert a.input_ids[0, :10].tolist() == tok(paragraphs[0], add_special_tokens=False)["input_ids"][:10]


def test_hub_dataset_streamed(model, fake_hub, tmp_path):
    src = model("llama")
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train-00000.jsonl").write_text(json.dumps({"text": TEXT[:300]}) + "\n")
    (folder / "data" / "train-00001.jsonl").write_text(json.dumps({"text": TEXT[300:]}) + "\n")
    (folder / "data" / "test-00000.jsonl").write_text(json.dumps({"text": "other"}) + "\n")
    fake_hub.add_dataset("org/calib", folder)
    data = _ids(src, "org/calib", samples=2, seq_len=64, endpoint=fake_hub.url)
    local = tmp_path / "same.jsonl"
    local.write_text(json.dumps({"text": TEXT[:300]}) + "\n" + json.dumps({"text": TEXT[300:]}) + "\n")
    assert torch.equal(data.input_ids, _ids(src, local, samples=2, seq_len=64).input_ids)
    assert data.split == "train"
    with pytest.raises(ConvertError, match="split 'validation'"):
        _ids(src, "org/calib", samples=2, seq_len=64, endpoint=fake_hub.url, split="validation")


BAD_INPUT = {  # case: what the one error line must name
    "empty": "holds no text", "column": "no column 'text'", "short": "fewer than 100 samples x 48 tokens",
    "unknown_dataset": "org/no-such-dataset", "unreachable": "cannot reach the dataset",
    "missing": "no such calibration file",
    "remote_code": "my_custom_llm", "no_tokenizer": "no tokenizer files", "headroom": "--calib-headroom",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_calibration_input_is_one_line_and_writes_nothing(case, model, tiny, text_file, tmp_path, fake_hub):
    from typer.testing import CliRunner

    from checks import assert_one_line_error
    from nvfp4_convert.cli import app

    src = model("llama")
    data, extra = str(text_file), []
    if case == "empty":
        (tmp_path / "empty.txt").write_text("")
        data = str(tmp_path / "empty.txt")
    elif case == "column":
        (tmp_path / "rows.jsonl").write_text(json.dumps({"content": TEXT}) + "\n")
        data = str(tmp_path / "rows.jsonl")
    elif case == "short":
        extra = ["--calib-samples", "100"]
    elif case == "unknown_dataset":
        data = "org/no-such-dataset"
        extra = ["--endpoint", fake_hub.url]
    elif case == "unreachable":  # nothing listens there
        data = "org/calib"
        extra = ["--endpoint", "http://127.0.0.1:9"]
    elif case == "missing":
        data = str(tmp_path / "nope.txt")
    elif case == "remote_code":
        config = json.loads((src / "config.json").read_text())
        config.update(model_type="my_custom_llm", auto_map={"AutoModelForCausalLM": "modeling_x.MyModel"})
        (src / "config.json").write_text(json.dumps(config))
    elif case == "no_tokenizer":
        src = tiny("llama")
    elif case == "headroom":
        extra = ["--calib-headroom", "0"]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(src), str(out), "--calibrate", data, "--calib-samples", "4",
                                      "--calib-seq-len", "48", "--no-progress", *extra])
    assert_one_line_error(result, BAD_INPUT[case])
    assert not out.exists()


def test_bad_input_messages(model, text_file, tmp_path, capsys):
    from nvfp4_convert.cli import main

    src = model("llama")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"content": TEXT}) + "\n")
    with pytest.raises(SystemExit):
        main([str(src), str(tmp_path / "o"), "--calibrate", str(tmp_path / "rows.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: line 1 has no column 'text' (has: content)") and "--calib-column" in err[-1]
    with pytest.raises(SystemExit):
        main([str(src), str(tmp_path / "o"), "--calibrate", str(text_file), "--calib-samples", "100"])
    err = capsys.readouterr().err.strip().splitlines()
    assert "fewer than 100 samples x 2048 tokens" in err[-1]


def _full_model_input(src, text_file, name):
    """The input of Linear ``name`` in a full transformers forward of the calibration ids, and its weight."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    seen = []
    hf.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    hf(_ids(src, text_file, samples=SAMPLES, seq_len=SEQ_LEN).input_ids)
    return seen[0].reshape(-1, seen[0].shape[-1]), hf.get_submodule(name).weight.detach()


def test_verify_activations_matches_a_full_model_forward(model, text_file, tmp_path, capsys):
    """verify --activations: the layer-by-layer inputs are the full model's, and the errors follow from them."""
    from nvfp4_convert.cli import main
    from nvfp4_convert.kernels import reference
    from nvfp4_convert.kernels.common import dequantize

    src = model("llama")
    out = tmp_path / "out"
    convert(str(src), out, calibrate=str(text_file), calib_samples=SAMPLES, calib_seq_len=SEQ_LEN, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(out), "--source", str(src), "--activations", str(text_file), "--calib-samples",
              str(SAMPLES), "--calib-seq-len", str(SEQ_LEN), "--no-progress", "--json", str(tmp_path / "v.json"),
              "--plots", str(tmp_path / "plots")])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "W4A4 stored input_scale" in printed and "model.layers.1" in printed
    plot = tmp_path / "plots" / "activation_error_per_layer.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {plot}" in printed
    got = json.loads((tmp_path / "v.json").read_text())["activations"]["modules"]

    name = "model.layers.1.mlp.down_proj"
    x, weight = _full_model_input(src, text_file, name)
    stored = load_all(out)
    wq = dequantize(stored[f"{name}.weight"], stored[f"{name}.weight_scale"], stored[f"{name}.weight_scale_2"])
    exact = x.float() @ weight.float().T
    scale = stored[f"{name}.input_scale"]
    xq = dequantize(*reference.quantize(x, scale), scale)
    for setting, inputs in (("w4a16", x.float()), ("w4a4", xq)):
        expected = ((exact - inputs @ wq.T).square().sum() / exact.square().sum()).sqrt().item()
        assert got[name][setting] == pytest.approx(expected, rel=1e-4), setting
    assert got[name]["w4a4"] > got[name]["w4a16"] > 0


def test_calibrated_weighted_block_scales(model, text_file, tmp_path):
    """--calibrate with --scales mse-weighted: each block scale minimizes the error weighted by the measured E[x^2]."""
    from nvfp4_convert.importance import FixedChannelWeights
    from nvfp4_convert.kernels import search

    src = model("llama")
    options = {"calibrate": str(text_file), "calib_samples": SAMPLES, "calib_seq_len": SEQ_LEN, "progress": False}
    report = convert(str(src), tmp_path / "cal", scales="mse-weighted", **options)
    assert "E[x^2]" in report.calibration["block_scales"]
    convert(str(src), tmp_path / "proxy", scales="mse-weighted", progress=False)
    cal, proxy = load_all(tmp_path / "cal"), load_all(tmp_path / "proxy")

    name = "model.layers.1.mlp.down_proj"
    x, weight = _full_model_input(src, text_file, name)
    second_moment = (x.float().square().sum(0).double() / x.shape[0]).float()
    packed, scales = search.quantize(weight, weight.abs().amax().float(),
                                     FixedChannelWeights({name: second_moment}).weights(name, None))
    assert raw_bytes(cal[f"{name}.weight_scale"]) == raw_bytes(scales)
    assert raw_bytes(cal[f"{name}.weight"]) == raw_bytes(packed)
    assert raw_bytes(cal[f"{name}.weight_scale"]) != raw_bytes(proxy[f"{name}.weight_scale"])


def test_block_fp8_source_calibrates_as_its_dequantized_bf16(model, text_file, tmp_path):
    """A block-FP8 source calibrates on the weights the converter quantizes: byte-equal to its BF16 equivalent."""
    src = model("qwen3_moe")

    def in_layers(name):
        return name.startswith("model.layers.") and ".mlp.gate." not in name

    fp8 = add_byte_tokenizer(make_fp8(src, tmp_path / "fp8", block=(16, 32), is_fp8=in_layers))
    bf16 = add_byte_tokenizer(expected_source(fp8, tmp_path / "bf16", (16, 32)))
    options = dict(calibrate=str(text_file), calib_samples=SAMPLES, calib_seq_len=SEQ_LEN, scales="mse-weighted",
                   progress=False, log=lambda _: None)
    report = convert(str(fp8), tmp_path / "out-fp8", **options)
    convert(str(bf16), tmp_path / "out-bf16", **options)
    assert report.plan.fp8_flavour.startswith("block FP8")
    got, want = load_all(tmp_path / "out-fp8"), load_all(tmp_path / "out-bf16")
    assert got.keys() == want.keys()
    scales = [n for n in got if n.endswith(".input_scale")]
    assert len(scales) > 10 and len({got[n].item() for n in scales}) > 3  # calibrated, not the 1.0 constant
    for name in got:  # input_scales and the E[x^2]-weighted block scales alike
        assert raw_bytes(got[name]) == raw_bytes(want[name]), name


def test_headroom_multiplies_the_calibrated_amax(model, text_file, tmp_path):
    from nvfp4_convert.output import read_conversion_info

    src = model("llama")
    options = dict(calibrate=str(text_file), calib_samples=2, calib_seq_len=32, progress=False, log=lambda _: None)
    convert(str(src), tmp_path / "plain", **options)
    convert(str(src), tmp_path / "room", calib_headroom=1.5, **options)
    plain, room = load_all(tmp_path / "plain"), load_all(tmp_path / "room")
    scales = [n for n in plain if n.endswith(".input_scale")]
    for name in scales:
        amax = (plain[name].double() * 2688).float()  # the calibrated amax, to within float32 rounding
        assert torch.allclose(room[name], global_scale(amax * 1.5).reshape(()), rtol=1e-6), name
    for name in plain.keys() - set(scales):
        assert raw_bytes(plain[name]) == raw_bytes(room[name]), name  # weights do not depend on headroom
    info = read_conversion_info(tmp_path / "room")
    assert info["calibration"]["headroom"] == 1.5 and "1.5 * max|x|" in info["activation_policy"]
    assert "headroom" not in read_conversion_info(tmp_path / "plain")["calibration"]


def test_a_long_text_is_tokenized_only_as_far_as_the_samples_need(model, tmp_path, monkeypatch):
    from nvfp4_convert.calibration import data as calibration_data

    src = model("llama")
    tok = load_tokenizer(open_source(str(src)), where="src")
    long = tmp_path / "long.txt"
    long.write_text("\n".join(f"line {i}: {TEXT[i % 50: i % 50 + 60]}" for i in range(4000)))  # ~300k chars
    seen = []
    original = calibration_data._tokens

    def counting(text, tokenizer, needed):
        ids = original(text, tokenizer, needed)
        seen.append(len(ids))
        return ids

    monkeypatch.setattr(calibration_data, "_tokens", counting)
    data = _ids(src, long, samples=4, seq_len=64)
    whole = tok(long.read_text(), add_special_tokens=False)["input_ids"]
    assert data.input_ids.reshape(-1).tolist() == whole[:256]
    assert seen and seen[0] < len(whole) // 2  # a prefix was enough


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_architectures_with_their_own_attention_or_embedding_buffers_calibrate(kind, model, text_file, tmp_path):
    """Gemma 2 (soft-capped attention: eager, not SDPA) and Gemma 3 (a scaled embedding's computed buffer)."""
    src = model(kind)
    convert(str(src), tmp_path / "out", calibrate=str(text_file), calib_samples=2, calib_seq_len=32, progress=False,
            log=lambda _: None)
    scales = {n: t for n, t in load_all(tmp_path / "out").items() if n.endswith(".input_scale")}
    assert len(scales) >= 14 and len({t.item() for t in scales.values()}) > 3


@pytest.mark.parametrize("layout", ["gemma3", "qwen2_5_vl", "qwen2_5_vl_hub"])
def test_vision_language_layouts_calibrate_as_the_full_model_runs(layout, model, text_file, tmp_path):
    """Gemma 3 (Hub files: language_model.model.*) and Qwen2.5-VL (transformers 5's model.language_model.*, and
    the Hub's model.*): the language model calibrates under the checkpoint's names, with the inputs a full
    transformers forward gives each Linear."""
    from functools import partial

    import transformers

    from tiny_models import _rename

    src = model(layout.removesuffix("_hub"))
    if layout == "qwen2_5_vl_hub":
        _rename(src, {"model.language_model.": "model.", "model.visual.": "visual."})
    convert(str(src), tmp_path / "out", calibrate=str(text_file), calib_samples=SAMPLES, calib_seq_len=SEQ_LEN,
            progress=False, log=lambda _: None)
    scales = {n[: -len(".input_scale")]: t for n, t in load_all(tmp_path / "out").items() if n.endswith(".input_scale")}
    assert len(scales) == 14 and len({t.item() for t in scales.values()}) > 3

    hf = transformers.AutoModelForImageTextToText.from_pretrained(src, dtype=torch.bfloat16)
    names = {"gemma3": "language_model.model", "qwen2_5_vl": "model.language_model", "qwen2_5_vl_hub": "model"}
    seen = {}

    def record(module, _, args):
        seen.setdefault(module, args[0].abs().amax().float())

    for module in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"):
        hf.model.language_model.get_submodule(module).register_forward_pre_hook(partial(record, module))
    hf(input_ids=_ids(src, text_file, samples=SAMPLES, seq_len=SEQ_LEN).input_ids)
    assert len(seen) == 2
    for module, amax in seen.items():
        name = f"{names[layout]}.{module}"
        assert raw_bytes(scales[name]) == raw_bytes(global_scale(amax).reshape(())), name
