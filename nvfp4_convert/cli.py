"""Command line: a thin typer layer over the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__, calibration
from .errors import ConvertError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn a Hugging Face LLM checkpoint into an NVFP4 checkpoint that vLLM, SGLang and TensorRT-LLM "
    "load like a ModelOpt export.\n\nUsage: nvfp4-convert SRC OUT [OPTIONS]  (SRC: a Hub repo id or a local folder)",
)
COMMANDS = {"convert", "bench", "verify", "push"}

DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


def _command_line() -> str:
    """This invocation as text, with any token value replaced (tokens are never recorded)."""
    args, shown = sys.argv[1:], []
    for i, arg in enumerate(args):
        if i and args[i - 1] == "--token":
            arg = "***"
        elif arg.startswith("--token="):
            arg = "--token=***"
        shown.append(arg)
    return " ".join(["nvfp4-convert", *shown])


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        raise exc
    if isinstance(exc, KeyboardInterrupt):
        typer.echo("interrupted; run the same command again to resume", err=True)
        raise typer.Exit(130)
    if isinstance(exc, ConvertError):
        typer.echo(f"error: {exc.line()}", err=True)
    else:
        typer.echo(f"error: {type(exc).__name__}: {exc} (re-run with --debug for details)", err=True)
    raise typer.Exit(2 if isinstance(exc, ConvertError) else 1)


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Hub repo id (e.g. meta-llama/Llama-3.1-8B-Instruct) or a local folder.")],
    out: Annotated[Path, typer.Argument(help="Output folder. Re-running the same command resumes it.")],
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit.")] = None,
    token: Annotated[str | None, typer.Option(help="Hub token for gated/private repos (default: HF_TOKEN).")] = None,
    endpoint: Annotated[str | None, typer.Option(help="Hub endpoint URL (mirrors).", hidden=True)] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Where Hub shards are downloaded, one at a time.")] = None,
    keep_source: Annotated[bool, typer.Option("--keep-source",
        help="Keep downloaded shards instead of deleting each after use.")
    ] = False,
    recipe: Annotated[Path | None, typer.Option(help="TOML recipe replacing the one picked by model_type.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        help="Keep modules matching this pattern in high precision (repeatable), e.g. '*self_attn*'.")
    ] = None,
    weight_only: Annotated[bool, typer.Option("--weight-only",
        help="Write W4A16_NVFP4 (no input_scale) instead of W4A4 NVFP4.")
    ] = False,
    max_shard_size: Annotated[str, typer.Option(help="Output shard size limit.")] = "5GB",
    backend: Annotated[str | None, typer.Option(help="Force a quantize backend (see `nvfp4-convert bench`).")] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Only use backends bit-exact with ModelOpt.")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")] = None,
    scales: Annotated[str, typer.Option(
        help="Block scales: rtn (from each block's max), mse (least squared error, as ModelOpt's MSE "
        "calibration) or mse-weighted (least error weighted per input channel by a data-free importance estimate).")
    ] = "rtn",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and exit; write nothing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite",
                                            help="Replace a previous conversion in OUT: only its files, once the "
                                            "new one is complete; other files are kept.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    calibrate: Annotated[str | None, typer.Option(
        help="Calibrate activations on this text: a .txt/.jsonl/.parquet file or a Hub dataset id (gives real "
        "input_scales; with --scales mse-weighted, block scales weighted by the measured E[x^2]).")
    ] = None,
    calib_samples: Annotated[int, typer.Option(help="With --calibrate: number of samples.")] = calibration.SAMPLES,
    calib_seq_len: Annotated[int, typer.Option(help="With --calibrate: tokens per sample.")] = calibration.SEQ_LEN,
    calib_column: Annotated[str | None, typer.Option(
        help="With --calibrate: text column of .jsonl/.parquet/Hub data (default: text).")
    ] = None,
    calib_split: Annotated[str | None, typer.Option(help="With --calibrate: Hub dataset split (default: train).")
    ] = None,
    push_to_hub: Annotated[str | None, typer.Option(
        help="After a successful conversion, verify OUT and upload it to this Hub repo.")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the repo private.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Convert SRC (Hub repo or folder) into an NVFP4 checkpoint in OUT."""
    from . import convert as run_convert
    from .report import format_plan, format_summary

    try:
        report = run_convert(
            src, out, revision=revision, token=token, endpoint=endpoint, work_dir=work_dir, keep_source=keep_source,
            recipe_file=recipe, excludes=exclude or [], weight_only=weight_only, max_shard_size=max_shard_size,
            backend=backend, exact=exact, threads=threads, scales=scales, dry_run=dry_run, overwrite=overwrite,
            progress=progress,
            calibrate=calibrate, calib_samples=calib_samples, calib_seq_len=calib_seq_len, calib_column=calib_column,
            calib_split=calib_split, command=_command_line(), log=lambda line: typer.echo(line, err=True),
        )
    except (ConvertError, KeyboardInterrupt, Exception) as exc:  # one line, not a traceback
        _fail(exc, debug)
    typer.echo(format_plan(report) if dry_run else format_summary(report))
    if push_to_hub and dry_run:
        typer.echo("dry run: nothing pushed", err=True)
    elif push_to_hub:
        _push(out, push_to_hub, private=private, token=token, endpoint=endpoint, debug=debug)


@app.command("verify")
def verify_command(
    out: Annotated[Path, typer.Argument(help="The converted checkpoint folder.")],
    source: Annotated[str | None, typer.Option(
        help="The source it was converted from (folder or Hub repo): also measure the error and check kept tensors "
             "are unchanged.")
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of --source.")] = None,
    token: Annotated[str | None,
                     typer.Option(help="Hub token for a gated/private --source (default: HF_TOKEN).")] = None,
    endpoint: Annotated[str | None, typer.Option(help="Hub endpoint URL (mirrors).", hidden=True)] = None,
    json_path: Annotated[Path | None,
                         typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
    plots: Annotated[Path | None,
                     typer.Option(help="Also write PNG plots to this folder (needs the 'plot' extra).")] = None,
    activations: Annotated[str | None, typer.Option(
        help="With --source: run this text (.txt/.jsonl/.parquet or Hub dataset) through the source layer by layer "
             "and report each layer's W4A16 and W4A4 output error with the stored scales.")
    ] = None,
    calib_samples: Annotated[int, typer.Option(help="With --activations: number of samples.")] = 32,
    calib_seq_len: Annotated[int, typer.Option(help="With --activations: tokens per sample.")] = 512,
    calib_column: Annotated[str | None, typer.Option(help="With --activations: text column (default: text).")] = None,
    calib_split: Annotated[str | None, typer.Option(help="With --activations: Hub dataset split.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    debug: DebugOpt = False,
) -> None:
    """Check OUT against the NVFP4 format contract; exit 1 on any violation."""
    from .verify import verify

    try:
        if activations and not source:
            raise ConvertError("--activations needs --source", where="verify",
                               fix="Pass the checkpoint OUT was converted from")
        report = verify(out, source=source, revision=revision, token=token, endpoint=endpoint, json_path=json_path,
                        plot_dir=plots, progress=progress)
        seen = None
        if activations:
            from .verify.activations import verify_activations

            seen = verify_activations(out, source=source, dataset=activations, samples=calib_samples,
                                      seq_len=calib_seq_len, column=calib_column, split=calib_split,
                                      revision=revision, token=token, endpoint=endpoint, progress=progress)
            if json_path:
                import json

                doc = json.loads(json_path.read_text())
                json_path.write_text(json.dumps({**doc, "activations": seen.to_dict()}, indent=2))
    except (ConvertError, KeyboardInterrupt, Exception) as exc:
        _fail(exc, debug)
    for violation in report.violations:
        typer.echo(f"violation: {violation.line()}")
    typer.echo(report.format_summary())
    for line in seen.lines() if seen else []:
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(1)


@app.command("push")
def push_command(
    out: Annotated[Path, typer.Argument(help="A finished conversion's output folder.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo to create (if needed) and upload to, e.g. me/Model-NVFP4.")],
    private: Annotated[bool, typer.Option("--private",
        help="Create the repo private (an existing repo keeps its visibility).")
    ] = False,
    token: Annotated[str | None,
                     typer.Option(help="Hub token with write access (default: HF_TOKEN or the stored login).")] = None,
    endpoint: Annotated[str | None, typer.Option(help="Hub endpoint URL (mirrors).", hidden=True)] = None,
    commit_message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Verify OUT, write its model card and upload it to the Hub."""
    _push(out, repo_id, private=private, token=token, endpoint=endpoint, commit_message=commit_message, debug=debug)


def _push(out: Path, repo_id: str, *, private: bool, token: str | None, endpoint: str | None, debug: bool,
          commit_message: str | None = None) -> None:
    from .publish import push

    try:
        url = push(out, repo_id, private=private, token=token, endpoint=endpoint, commit_message=commit_message)
    except (ConvertError, KeyboardInterrupt, Exception) as exc:
        _fail(exc, debug)
    typer.echo(f"pushed to {url}")


@app.command()
def bench(
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    backend: Annotated[list[str] | None, typer.Option(help="Only these backends (repeatable).")] = None,
    dtype: Annotated[str, typer.Option(help="Input dtype: bfloat16, float16 or float32.")] = "bfloat16",
    shape: Annotated[list[str] | None,
                     typer.Option(help="Weight shape RxK to time (repeatable), e.g. 8192x8192.")] = None,
    sweep: Annotated[bool,
                     typer.Option("--sweep", help="Time every M x K of M in 1..32768 and K in 128..16384.")] = False,
    repeats: Annotated[int, typer.Option(help="Timed calls per shape (the median is shown).")] = 5,
    csv: Annotated[Path | None, typer.Option(help="Also write the results to this CSV file.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Also plot the speedups to this PNG (needs matplotlib).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Measure quantize throughput of every available backend on a sweep of weight shapes."""
    from .bench import run_bench

    try:
        shapes = [tuple(int(n) for n in s.lower().split("x")) for s in shape] if shape else None
        run_bench(device=device, backends=backend, dtype=dtype, shapes=shapes, sweep=sweep, repeats=repeats,
                  csv_path=csv, plot_path=plot, out=typer.echo)
    except (ConvertError, KeyboardInterrupt, Exception) as exc:
        _fail(exc, debug)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nvfp4-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool,
                       typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``nvfp4-convert SRC OUT`` is short for ``nvfp4-convert convert SRC OUT``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and not args[0].startswith("-") and args[0] not in COMMANDS:
        args.insert(0, "convert")
    app(args=args, prog_name="nvfp4-convert")


if __name__ == "__main__":
    main()
