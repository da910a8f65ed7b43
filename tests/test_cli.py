"""The CLI is a thin layer: arguments reach the library unchanged; `SRC OUT` needs no subcommand."""

from __future__ import annotations

from unittest import mock

from typer.testing import CliRunner

from nvfp4_convert import cli

runner = CliRunner()


def test_shorthand_and_options_reach_convert(tmp_path):
    with mock.patch("nvfp4_convert.convert") as convert, mock.patch("nvfp4_convert.report.format_summary",
                                                                    return_value="ok"):
        try:
            cli.main(["org/model", str(tmp_path), "--revision", "v1", "--exclude", "*self_attn*", "--exclude",
                      "lm_head",
                      "--weight-only", "--max-shard-size", "2GB", "--threads", "3", "--exact"])
        except SystemExit as exc:
            assert exc.code in (0, None)
    kwargs = convert.call_args.kwargs
    assert convert.call_args.args == ("org/model", tmp_path)
    assert kwargs["revision"] == "v1" and kwargs["excludes"] == ["*self_attn*", "lm_head"]
    assert kwargs["weight_only"] and kwargs["max_shard_size"] == "2GB" and kwargs["threads"] == 3 and kwargs["exact"]
    assert kwargs["token"] is None and kwargs["dry_run"] is False


def test_token_is_redacted_from_recorded_command(monkeypatch):
    monkeypatch.setattr("sys.argv", ["nvfp4-convert", "a", "b", "--token", "hf_abc", "--token=hf_def"])
    line = cli._command_line()
    assert "hf_abc" not in line and "hf_def" not in line and "***" in line


def test_help_explains_usage():
    result = runner.invoke(cli.app, ["convert", "--help"])
    assert result.exit_code == 0
    for words in ("Hub repo id", "--dry-run", "--weight-only", "--exclude", "resume"):
        assert words in result.output


def test_dry_run_prints_plan(tiny, tmp_path):
    result = runner.invoke(cli.app, ["convert", str(tiny("qwen3_moe")), str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "model.layers.*.mlp.experts.*.gate_proj.weight" in result.output and "NVFP4 (fused x2)" in result.output
    assert not (tmp_path / "out").exists()


def test_version():
    assert "nvfp4-convert" in runner.invoke(cli.app, ["--version"]).output
