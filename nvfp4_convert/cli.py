"""Command line: a thin typer layer over the library.

Exit status: 0 success; 1 ``verify`` found violations, or an unexpected internal error; 2 bad input or bad
usage, printed as one ``error:`` line; 130 interrupted. Every command's errors go through one boundary
(:meth:`_Group.invoke`), which ``main()`` and ``typer.testing.CliRunner`` both pass through.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from . import __version__, calibration
from .errors import ConvertError

EXIT_OK, EXIT_VIOLATIONS, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
COMMANDS = ("convert", "verify", "push", "bench")
RESUMABLE = ("convert",)  # commands that pick up where an interrupted run stopped


class _QuickHelp:
    """``--help`` defaults to False, not None: typer then skips value coercion for it, which would import pydantic
    (a tenth of a second) before the help is printed."""

    def get_help_option(self, ctx: typer.Context):
        option = super().get_help_option(ctx)
        if option is not None and option.default is None:
            option.default = False
        return option


class _PlainArgument(TyperArgument):
    """A positional listed by its name alone (``SRC``, not ``SRC <str>``): its help says what it takes."""

    def display_type_rich(self, ctx: typer.Context) -> None:
        return None


class _Command(_QuickHelp, TyperCommand):
    """A command whose usage line reads ``SRC OUT [OPTIONS]`` (positionals as plain upper-case names)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if type(param) is TyperArgument:
                param.__class__ = _PlainArgument

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [p.strip("{}") for p in super().collect_usage_pieces(ctx)]
        return [*pieces[1:], *pieces[:1]]  # options last, as the commands are usually typed


class _Group(_QuickHelp, TyperGroup):
    """The root group; its :meth:`invoke` is the CLI's single error boundary."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta["debug"] = "--debug" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            typer.echo(_interrupted_line(ctx.invoked_subcommand), err=True)
            _INTERRUPTS.reported = True
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if ctx.meta.get("debug"):
                raise
            if isinstance(exc, ConvertError):
                typer.echo(f"error: {exc.line()}", err=True)
                raise typer.Exit(EXIT_BAD_INPUT) from None
            if isinstance(exc, typer.TyperException) and hasattr(exc, "format_message"):  # bad usage
                command = f"nvfp4-convert {ctx.invoked_subcommand or ''}".strip()
                typer.echo(f"error: {exc.format_message().rstrip('.')} (see {command} --help)", err=True)
                raise typer.Exit(getattr(exc, "exit_code", EXIT_BAD_INPUT)) from None
            typer.echo(f"error: {type(exc).__name__}: {exc} (re-run with --debug for the traceback)", err=True)
            raise typer.Exit(EXIT_VIOLATIONS) from None


def _interrupted_line(command: str | None) -> str:
    return "interrupted" + ("; run the same command again to resume" if command in RESUMABLE else "")


class _Interrupts:
    """Ctrl-C while ``main()`` runs a command: the first one unwinds it (cleanup runs, the boundary prints the
    one line); any later one, during that cleanup or the interpreter's exit (joining worker threads), ends
    the process at once with the same line, printed once, and exit 130. Writes are atomic and the resume
    record checks what it keeps, so the output stays resumable either way."""

    def __init__(self) -> None:
        self.count, self.line, self.reported = 0, "interrupted", False

    def install(self, line: str) -> None:
        self.line = line
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the caller ignores it
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            raise KeyboardInterrupt
        if not self.reported:
            os.write(2, f"{self.line}\n".encode())
        os._exit(EXIT_INTERRUPTED)


_INTERRUPTS = _Interrupts()


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Turn a Hugging Face LLM checkpoint into an NVFP4 checkpoint that vLLM, SGLang and TensorRT-LLM load "
    "like a ModelOpt export.\n\n"
    "\b\n"
    "  nvfp4-convert SRC OUT [OPTIONS]      convert SRC (a Hub repo id or a local folder) into OUT\n"
    "  nvfp4-convert verify OUT [OPTIONS]   check a converted checkpoint\n"
    "  nvfp4-convert push OUT REPO          verify OUT and upload it with a model card\n"
    "  nvfp4-convert bench [OPTIONS]        time the quantize backends on this machine\n\n"
    "Re-running an interrupted conversion resumes it. See nvfp4-convert COMMAND --help.",
    epilog="Exit status: 0 success; 1 verify found violations, or an internal error; 2 bad input or usage (one "
    "'error:' line on stderr); 130 interrupted.",
)


def _flag(*names: str, help: str) -> typer.models.OptionInfo:
    """An on/off option shown without a value type (``--dry-run``, not ``--dry-run <bool>``)."""
    return typer.Option(*names, metavar="", help=help)


# Options shared by several commands.
RevisionOpt = Annotated[str | None, typer.Option(metavar="REV", help="Hub branch, tag or commit of the source.")]
TokenOpt = Annotated[str | None, typer.Option(
    metavar="TOKEN", help="Hub token for gated or private repos (default: HF_TOKEN or the stored login).")]
EndpointOpt = Annotated[str | None, typer.Option(
    metavar="URL", help="Hub endpoint, e.g. a mirror (default: HF_ENDPOINT or https://huggingface.co).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", metavar="", help="Show progress bars.")]
PrivateOpt = Annotated[bool, _flag("--private", help="Create the Hub repo private (an existing one keeps its "
                                                     "visibility).")]
DebugOpt = Annotated[bool, _flag("--debug", help="Show the full traceback on errors.")]


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


@app.command(cls=_Command)
def convert(
    src: Annotated[str, typer.Argument(metavar="SRC", show_default=False,
                                       help="Hub repo id (e.g. meta-llama/Llama-3.1-8B-Instruct) or a local folder.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", show_default=False,
                                        help="Output folder. Re-running the same command resumes it.")],
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    endpoint: EndpointOpt = None,
    work_dir: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Where Hub shards are downloaded, one at a time (default: a temporary folder).")] = None,
    keep_source: Annotated[bool, _flag("--keep-source", help="Keep downloaded shards instead of deleting each "
                                                             "once converted.")] = False,
    recipe: Annotated[Path | None, typer.Option(
        metavar="FILE", help="TOML recipe to use instead of the one chosen by config.json's model_type.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        metavar="PATTERN", help="Keep modules matching this pattern in high precision, e.g. '*self_attn*' "
                                "(repeatable).")] = None,
    weight_only: Annotated[bool, _flag("--weight-only", help="Write W4A16_NVFP4 (no input_scale) instead of "
                                                             "W4A4 NVFP4.")] = False,
    max_shard_size: Annotated[str, typer.Option(metavar="SIZE", help="Output shard size limit, e.g. 5GB or "
                                                                     "500MB.")] = "5GB",
    backend: Annotated[str | None, typer.Option(
        metavar="NAME", help="Quantize with this backend ('nvfp4-convert bench' lists them; default: the "
                             "fastest that proves itself here).")] = None,
    exact: Annotated[bool, _flag("--exact", help="Only use backends bit-exact with ModelOpt.")] = False,
    threads: Annotated[int | None, typer.Option(metavar="N", help="CPU threads (default: all cores).")] = None,
    scales: Annotated[str, typer.Option(
        metavar="rtn|mse|mse-weighted", help="Block scales: rtn (from each block's max), mse (least squared error, "
        "as ModelOpt's MSE calibration) or mse-weighted (least error weighted per input channel by a data-free "
        "importance estimate).")] = "rtn",
    dry_run: Annotated[bool, _flag("--dry-run", help="Print the plan and exit; write nothing.")] = False,
    overwrite: Annotated[bool, _flag("--overwrite", help="Replace a previous conversion in OUT: only its files, "
                                                         "once the new one is complete; other files are kept.")
                         ] = False,
    progress: ProgressOpt = True,
    calibrate: Annotated[str | None, typer.Option(
        metavar="DATA", help="Calibrate activations on this text: a .txt/.jsonl/.parquet file or a Hub dataset id "
                             "(gives real input_scales; with --scales mse-weighted, block scales weighted by the "
                             "measured E[x^2]).")] = None,
    calib_samples: Annotated[int, typer.Option(
        metavar="N", help="With --calibrate: number of samples.")] = calibration.SAMPLES,
    calib_seq_len: Annotated[int, typer.Option(
        metavar="N", help="With --calibrate: tokens per sample.")] = calibration.SEQ_LEN,
    calib_column: Annotated[str | None, typer.Option(
        metavar="NAME", help="With --calibrate: text column of .jsonl/.parquet/Hub data (default: text).")] = None,
    calib_split: Annotated[str | None, typer.Option(
        metavar="NAME", help="With --calibrate: Hub dataset split (default: train).")] = None,
    calib_headroom: Annotated[float, typer.Option(
        metavar="F", help="With --calibrate: multiply each calibrated max|x| by F before input_scale = "
                          "max / (6 * 448) (1.0 is ModelOpt's value).")] = 1.0,
    push_to_hub: Annotated[str | None, typer.Option(
        metavar="REPO", help="After converting, verify OUT and upload it to this Hub repo.")] = None,
    private: PrivateOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Convert SRC into an NVFP4 checkpoint in OUT.

    SRC is a Hub repo id or a local folder. Re-running the same command resumes an interrupted run.
    """
    from . import convert as run_convert

    report = run_convert(
        src, out, revision=revision, token=token, endpoint=endpoint, work_dir=work_dir, keep_source=keep_source,
        recipe_file=recipe, excludes=exclude or [], weight_only=weight_only, max_shard_size=max_shard_size,
        backend=backend, exact=exact, threads=threads, scales=scales, dry_run=dry_run, overwrite=overwrite,
        progress=progress,
        calibrate=calibrate, calib_samples=calib_samples, calib_seq_len=calib_seq_len, calib_column=calib_column,
        calib_split=calib_split, calib_headroom=calib_headroom, command=_command_line(),
        log=lambda line: typer.echo(line, err=True),
    )
    typer.echo(report.format_plan() if dry_run else report.format_summary())
    if push_to_hub and dry_run:
        typer.echo("dry run: nothing pushed", err=True)
    elif push_to_hub:
        _push(out, push_to_hub, private=private, token=token, endpoint=endpoint)


@app.command("verify", cls=_Command)
def verify_command(
    out: Annotated[Path, typer.Argument(metavar="OUT", show_default=False, help="The converted checkpoint folder.")],
    source: Annotated[str | None, typer.Option(
        metavar="SRC", help="The checkpoint OUT was converted from (folder or Hub repo): also measure the error "
                            "and check that kept tensors are unchanged.")] = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    endpoint: EndpointOpt = None,
    json_path: Annotated[Path | None, typer.Option("--json", metavar="FILE",
                                                   help="Also write the report as JSON to this file.")] = None,
    plots: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Also write PNG plots to this folder (needs the 'plot' extra).")] = None,
    activations: Annotated[str | None, typer.Option(
        metavar="DATA", help="With --source: run this text (.txt/.jsonl/.parquet or Hub dataset) through the source "
                             "layer by layer and report each layer's W4A16 and W4A4 output error with the stored "
                             "scales.")] = None,
    calib_samples: Annotated[int, typer.Option(metavar="N", help="With --activations: number of samples.")] = 32,
    calib_seq_len: Annotated[int, typer.Option(metavar="N", help="With --activations: tokens per sample.")] = 512,
    calib_column: Annotated[str | None, typer.Option(
        metavar="NAME", help="With --activations: text column (default: text).")] = None,
    calib_split: Annotated[str | None, typer.Option(metavar="NAME", help="With --activations: Hub dataset split.")
                           ] = None,
    progress: ProgressOpt = True,
    debug: DebugOpt = False,
) -> None:
    """Check a converted checkpoint (exit status 1 on violations).

    Checks OUT against the NVFP4 format contract serving engines rely on; with --source, also measures the
    quantization error and checks that every kept tensor is unchanged.
    """
    from .verify import verify

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
        if plots:
            from .verify.plots import save_activation_plots

            report.written.extend(save_activation_plots(seen, plots))
    for violation in report.violations:
        typer.echo(f"violation: {violation.line()}")
    typer.echo(report.format_summary())
    for line in seen.lines() if seen else []:
        typer.echo(line)
    for path in report.written:
        typer.echo(f"wrote {path}")
    if not report.ok:
        raise typer.Exit(EXIT_VIOLATIONS)


@app.command("push", cls=_Command)
def push_command(
    out: Annotated[Path, typer.Argument(metavar="OUT", show_default=False,
                                        help="A finished conversion's output folder.")],
    repo_id: Annotated[str, typer.Argument(metavar="REPO", show_default=False,
                                           help="Hub repo to create (if needed) and upload to, e.g. me/Model-NVFP4.")],
    private: PrivateOpt = False,
    token: TokenOpt = None,
    endpoint: EndpointOpt = None,
    commit_message: Annotated[str | None, typer.Option(metavar="TEXT", help="Commit message.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Verify OUT and upload it with a model card to a Hub repo."""
    _push(out, repo_id, private=private, token=token, endpoint=endpoint, commit_message=commit_message)


def _push(out: Path, repo_id: str, *, private: bool, token: str | None, endpoint: str | None,
          commit_message: str | None = None) -> None:
    from .publish import push

    url = push(out, repo_id, private=private, token=token, endpoint=endpoint, commit_message=commit_message)
    typer.echo(f"pushed to {url}")


def _shape(text: str) -> tuple[int, int]:
    rows, sep, cols = text.lower().partition("x")
    if not (sep and rows.strip().isdigit() and cols.strip().isdigit()):
        raise ConvertError(f"cannot read shape {text!r}", where="--shape", fix="Use ROWSxCOLS, e.g. 8192x8192")
    return int(rows), int(cols)


@app.command(cls=_Command)
def bench(
    device: Annotated[str, typer.Option(metavar="cpu|cuda", help="Where to run the backends.")] = "cpu",
    backend: Annotated[list[str] | None, typer.Option(
        metavar="NAME", help="Only this backend (repeatable; default: all for the device).")] = None,
    dtype: Annotated[str, typer.Option(metavar="DTYPE",
                                       help="Input dtype: bfloat16, float16 or float32.")] = "bfloat16",
    shape: Annotated[list[str] | None, typer.Option(
        metavar="RxK", help="Weight shape to time (repeatable), e.g. 8192x8192.")] = None,
    sweep: Annotated[bool, _flag("--sweep", help="Time every M x K of M in 1..32768 and K in 128..16384.")] = False,
    repeats: Annotated[int, typer.Option(metavar="N", help="Timed calls per shape (the median is shown).")] = 5,
    csv: Annotated[Path | None, typer.Option(metavar="FILE", help="Also write the results to this CSV file.")] = None,
    plot: Annotated[Path | None, typer.Option(
        metavar="FILE", help="Also plot the speedups to this PNG (needs the 'plot' extra).")] = None,
    scales: Annotated[list[str] | None, typer.Option(
        metavar="MODE", help="Instead, time the block-scale search in this mode (mse or mse-weighted; "
                             "repeatable) against round-to-nearest, for each backend that has one.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Time the quantize backends on this machine.

    Each backend is timed against the pure-torch reference in the same run.
    """
    from .bench import run_bench, run_scales_bench

    shapes = [_shape(s) for s in shape] if shape else None
    if scales:
        run_scales_bench(device=device, backends=backend, dtype=dtype, shapes=shapes, modes=scales, repeats=repeats,
                         out=typer.echo)
        return
    run_bench(device=device, backends=backend, dtype=dtype, shapes=shapes, sweep=sweep, repeats=repeats,
              csv_path=csv, plot_path=plot, out=typer.echo)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nvfp4-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", metavar="", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``nvfp4-convert SRC OUT [OPTIONS]`` is short for ``nvfp4-convert convert SRC OUT [OPTIONS]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in COMMANDS and args[0] not in ("--help", "--version"):
        args.insert(0, "convert")  # also when an option comes first: `nvfp4-convert --dry-run SRC OUT`
    _INTERRUPTS.install(_interrupted_line(args[0] if args else None))
    try:
        app(args=args, prog_name="nvfp4-convert")
    finally:
        _INTERRUPTS.count += 1  # the command is over: a Ctrl-C during the exit only ends it sooner


if __name__ == "__main__":
    main()
