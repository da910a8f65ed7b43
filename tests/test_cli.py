"""The CLI is a thin layer: arguments reach the library unchanged, help reads plainly, errors are one line."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from typer.testing import CliRunner

from checks import assert_one_line_error
from nvfp4_convert import cli

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


def _main(*args: str) -> int:
    """Run ``cli.main`` (the installed entry point) and return its exit status."""
    try:
        cli.main(list(args))
    except SystemExit as exc:
        return exc.code or 0
    return 0


@pytest.mark.parametrize("first", ["SRC", "option"])
def test_shorthand_and_options_reach_convert(tmp_path, first):
    options = ["--revision", "v1", "--exclude", "*self_attn*", "--exclude", "lm_head", "--weight-only",
               "--max-shard-size", "2GB", "--threads", "3", "--exact"]
    args = ["org/model", str(tmp_path), *options] if first == "SRC" else [*options, "org/model", str(tmp_path)]
    with mock.patch("nvfp4_convert.convert") as convert:
        convert.return_value.format_summary.return_value = "summary"
        assert _main(*args) == 0
    kwargs = convert.call_args.kwargs
    assert convert.call_args.args == ("org/model", tmp_path)
    assert kwargs["revision"] == "v1" and kwargs["excludes"] == ["*self_attn*", "lm_head"]
    assert kwargs["weight_only"] and kwargs["max_shard_size"] == "2GB" and kwargs["threads"] == 3 and kwargs["exact"]
    assert kwargs["token"] is None and kwargs["endpoint"] is None and kwargs["dry_run"] is False


def test_dry_run_before_src(tmp_path, capsys):
    with mock.patch("nvfp4_convert.convert") as convert:
        convert.return_value.format_plan.return_value = "the plan"
        assert _main("--dry-run", "org/model", str(tmp_path)) == 0
    assert convert.call_args.kwargs["dry_run"] is True and "the plan" in capsys.readouterr().out


def test_token_is_redacted_from_recorded_command(monkeypatch):
    monkeypatch.setattr("sys.argv", ["nvfp4-convert", "a", "b", "--token", "hf_abc", "--token=hf_def"])
    line = cli._command_line()
    assert "hf_abc" not in line and "hf_def" not in line and "***" in line


@pytest.mark.parametrize("command", [[], ["convert"], ["verify"], ["push"], ["bench"]])
def test_help_reads_plainly(command):
    result = runner.invoke(cli.app, [*command, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    text = result.output
    assert "<bool>" not in text and "list[" not in text and "{" not in text, text
    assert "<str>" not in text and "<path>" not in text, text  # positionals read as SRC, OUT, REPO
    if command == ["convert"]:
        assert "convert SRC OUT [OPTIONS]" in text
        for words in ("Hub repo id", "--dry-run ", "--weight-only ", "--exclude PATTERN", "--endpoint URL",
                      "resume"):
            assert words in text, words
    if not command:
        assert "nvfp4-convert SRC OUT" in text and "Exit status" in text


def test_dry_run_prints_plan(tiny, tmp_path):
    result = runner.invoke(cli.app, ["convert", str(tiny("qwen3_moe")), str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "model.layers.*.mlp.experts.*.gate_proj.weight" in result.output and "NVFP4 (fused x2)" in result.output
    assert not (tmp_path / "out").exists()


def test_version():
    assert runner.invoke(cli.app, ["--version"]).output.strip() == f"nvfp4-convert {cli.__version__}"


def test_help_and_version_stay_light():
    """torch (seconds) and pydantic (a tenth of a second, typer's value coercion) wait for a real command."""
    code = ("import sys; from nvfp4_convert.cli import main\n"
            "for args in (['--version'], ['--help'], ['convert', '--help'], ['verify', '--help'], ['push', '--help'],"
            " ['bench', '--help']):\n"
            "    try: main(args)\n"
            "    except SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'pydantic') if m in sys.modules]\n"
            "assert not heavy, f'imported {heavy}'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# -- errors: one line, exit 2 ------------------------------------------------------------------------


@pytest.mark.parametrize("args,needles", [
    (["bench", "--shape", "8192"], ["cannot read shape '8192'", "--shape", "8192x8192"]),
    (["bench", "--shape", "8x20"], ["cannot time shape 8x20", "multiple of 16"]),
    (["bench", "--backend", "nope"], ["unknown backend 'nope'"]),
    (["bench", "--dtype", "int4"], ["unknown dtype 'int4'"]),
    (["convert", "a", "b", "--threads", "-1"], ["--threads must be a whole number"]),
    (["bench", "--repeats", "0"], ["cannot time 0 calls", "--repeats"]),
    (["convert", "a", "b", "--dry-run", "true"], ["unexpected extra argument", "convert --help"]),
    (["convert"], ["Missing argument 'SRC'"]),
])
def test_bad_arguments_are_one_line(args, needles):
    assert_one_line_error(runner.invoke(cli.app, args), *needles)


def test_bench_cuda_without_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_line_error(runner.invoke(cli.app, ["bench", "--device", "cuda"]), "no CUDA GPU", "--device cpu")


def test_bench_plot_without_matplotlib_fails_before_timing(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with mock.patch("nvfp4_convert.bench._measure") as measure:
        result = runner.invoke(cli.app, ["bench", "--plot", str(tmp_path / "p.png"), "--shape", "16x16"])
    assert_one_line_error(result, "plots need matplotlib", "--plot", "nvfp4-convert[plot]")
    measure.assert_not_called()


def test_library_rejects_bad_thread_count(tmp_path):
    from nvfp4_convert import ConvertError, convert

    with pytest.raises(ConvertError, match="--threads must be a whole number"):
        convert("org/model", tmp_path, threads=-1)


@pytest.mark.parametrize("command,resume", [("convert", True), ("verify", False)])
def test_interrupt_exits_130_and_says_resume_only_where_it_resumes(tmp_path, command, resume):
    target = "nvfp4_convert.convert" if command == "convert" else "nvfp4_convert.verify.verify"
    args = ["convert", "src", str(tmp_path)] if command == "convert" else ["verify", str(tmp_path)]
    with mock.patch(target, side_effect=KeyboardInterrupt):
        result = runner.invoke(cli.app, args)
    assert result.exit_code == 130
    assert result.stderr.startswith("interrupted") and ("resume" in result.stderr) == resume


def test_unexpected_error_names_its_type_and_exits_1(tmp_path):
    with mock.patch("nvfp4_convert.convert", side_effect=ZeroDivisionError("boom")):
        result = runner.invoke(cli.app, ["convert", "src", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: ZeroDivisionError: boom (re-run with --debug for the traceback)"


def test_exit_codes_are_documented():
    text = README.read_text()
    for code in ("0", "1", "2", "130"):
        assert re.search(rf"`{code}`", text), code
