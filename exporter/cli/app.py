"""The edge-export command line: parse options, call a command, render its result, map errors to exit codes.

There is deliberately no bare `export` command: `export` is a shell builtin. The flags every command
shares are declared once, in exporter/cli/options.py.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.logging import RichHandler
from rich.table import Table

from exporter.cli.batch import batch_command
from exporter.cli.fit_flags import DEFAULT_FIT_TRIALS, FIT_BPW_FLAG, FIT_FLAG, FIT_TRIALS_FLAG, fit_options
from exporter.cli.option_groups import parse_size, with_options
from exporter.cli.options import (
    CALIBRATION_FLAG,
    CALIBRATION_TOKENS_FLAG,
    CHECK_FLAG,
    DTYPE_FLAG,
    IMATRIX_FLAG,
    INPUTS,
    KEEP_MERGED_FLAG,
    OUTPUT,
    PROFILES,
    QLORA,
    QUALITY,
    RUN,
)
from exporter.cli.render import console, err_console, print_check, print_export, print_runtime
from exporter.core.errors import (
    BAD_INPUT_EXIT,
    GATE_FAILED_EXIT,
    INTERNAL_ERROR_EXIT,
    INTERRUPTED_EXIT,
    ExportError,
)
from exporter.core.units import human_size
from exporter.inputs.options import DEFAULT_CALIBRATION_TOKENS

if TYPE_CHECKING:
    from exporter.inputs.options import (
        InputOptions,
        OutputOptions,
        ProfileOptions,
        QloraOptions,
        QualityOptions,
        RunOptions,
    )

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn a fine-tuned LoRA adapter into quantized GGUF models for laptops, phones and edge boxes.",
)
STATE = {"debug": False}


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    STATE["debug"] = debug
    logging.basicConfig(
        level=logging.INFO if debug else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_time=False, show_path=False)],
    )
    if not debug:
        # PEFT imports bitsandbytes, which warns that an optional CPU kernel package is missing (it only
        # speeds up 4-bit matmuls; edge-export uses bitsandbytes' quantize/dequantize alone).
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@contextmanager
def _progress(first: str) -> Iterator[Callable[[str], None]]:
    """A status line that shows the current stage, and a log line per stage."""
    with console.status(first) as status:

        def report(message: str) -> None:
            status.update(message)
            console.log(message)

        yield report


@app.command("merge-quantize")
@with_options(INPUTS, OUTPUT, PROFILES, RUN, QUALITY, QLORA)
def merge_quantize_command(
    inputs: InputOptions,
    output: OutputOptions,
    profiles: ProfileOptions,
    run: RunOptions,
    quality: QualityOptions,
    qlora: QloraOptions,
    check: CHECK_FLAG = True,
    dtype: DTYPE_FLAG = None,
    calibration: CALIBRATION_FLAG = None,
    calibration_tokens: CALIBRATION_TOKENS_FLAG = DEFAULT_CALIBRATION_TOKENS,
    imatrix: IMATRIX_FLAG = None,
    keep_merged: KEEP_MERGED_FLAG = False,
    fit: FIT_FLAG = None,
    fit_bpw: FIT_BPW_FLAG = None,
    fit_trials: FIT_TRIALS_FLAG = DEFAULT_FIT_TRIALS,
) -> None:
    """Merge the adapter into its base, convert to GGUF, quantize to each profile and check the quality."""
    from exporter.commands.merge_quantize import merge_quantize
    from exporter.inputs.options import ExportOptions

    # fmt: off
    options = ExportOptions(inputs, output, profiles, run, quality, check, dtype, calibration, calibration_tokens,
                            imatrix, qlora, keep_merged, fit_options(fit, fit_bpw, fit_trials))
    # fmt: on
    with _progress("starting") as report:
        result = merge_quantize(options, report=report)
    print_export(result)
    if result.quality and not result.quality.passed:
        raise typer.Exit(GATE_FAILED_EXIT)


@app.command("runtime-lora")
@with_options(INPUTS, OUTPUT, PROFILES, RUN, QUALITY)
def runtime_lora_command(
    inputs: InputOptions,
    output: OutputOptions,
    profiles: ProfileOptions,
    run: RunOptions,
    quality: QualityOptions,
    check: Annotated[
        bool,
        typer.Option(
            "--check/--no-check", help="Check every base+adapter pair against the unmerged reference."
        ),
    ] = True,
    compare_merged: Annotated[
        bool,
        typer.Option(
            "--compare-merged",
            help="Also export each adapter by merge-then-quantize and report both side by side.",
        ),
    ] = False,
) -> None:
    """Quantize the unmerged base once per profile and convert each adapter to a GGUF LoRA on it."""
    from exporter.commands.runtime_lora import runtime_lora
    from exporter.inputs.options import RuntimeLoraOptions

    options = RuntimeLoraOptions(inputs, output, profiles, run, quality, check, compare_merged)
    with _progress("starting") as report:
        result = runtime_lora(options, report=report)
    print_runtime(result)
    if result.quality and not result.passed:
        raise typer.Exit(GATE_FAILED_EXIT)


@app.command("merge")
@with_options(
    INPUTS, OUTPUT.without("name", "mmproj_type"), RUN.without("cache", "rehash", "jobs", "threads")
)
def merge_command(
    inputs: InputOptions,
    output: OutputOptions,
    run: RunOptions,
    dtype: DTYPE_FLAG = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 2GB or 500MB.")
    ] = "2GB",
) -> None:
    """Merge adapters into the base and write the merged model as safetensors (no GGUF)."""
    import time

    from exporter.commands.merge import merge_model
    from exporter.inputs.options import MergeOptions

    options = MergeOptions(inputs, output, run, dtype, parse_size(max_shard_size))
    start = time.perf_counter()
    with _progress("merging") as report:
        result = merge_model(options, report=report)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in result.path.glob("*.safetensors"))
    console.print(
        f"merged {result.merged_tensors} of {result.total_tensors} tensors into {result.path} "
        f"({result.dtype}, {result.shards} shard(s), {human_size(size)}) in {seconds:.1f}s"
        + ("; untied the embeddings (the adapter changes one side)" if result.untied_embeddings else "")
    )
    from exporter.merge import PROVENANCE_FILE

    console.print(f"coverage: {result.coverage['summary']} (the ledger: {result.path / PROVENANCE_FILE})")


@app.command("check")
@with_options(RUN.without("jobs"), QUALITY)
def check_command(
    run: RunOptions,
    quality: QualityOptions,
    manifest: Annotated[Path, typer.Option("--manifest", help="The manifest.json merge-quantize wrote.")],
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", help="An earlier report.json to compare with (within tolerance)."),
    ] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML here for CI.")] = None,
    kld_tolerance: Annotated[
        float,
        typer.Option("--kld-tolerance", help="Allowed relative growth of mean KLD against the baseline."),
    ] = 0.10,
    top1_tolerance: Annotated[
        float, typer.Option("--top1-tolerance", help="Allowed absolute drop of top-1 against the baseline.")
    ] = 0.005,
) -> None:
    """Re-check an export on CPU for CI: gates, an optional baseline, JUnit XML. Exit 1 on failure."""
    from exporter.commands.check import check_manifest
    from exporter.inputs.options import CheckOptions

    options = CheckOptions(manifest, run, quality, baseline, junit, kld_tolerance, top1_tolerance)
    with _progress("checking") as report:
        result = check_manifest(options, report=report)
    print_check(result, baseline)
    if not result.passed:
        raise typer.Exit(GATE_FAILED_EXIT)


@app.command("modelfile")
def modelfile_command(
    check: Annotated[
        Path | None, typer.Option("--check", help="Validate this Modelfile by Ollama's parser rules.")
    ] = None,
    gguf: Annotated[
        Path | None,
        typer.Option("--gguf", help="(Re)write the Modelfile for this GGUF from its embedded chat template."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write it (default: next to the GGUF, .Modelfile).")
    ] = None,
    num_ctx: Annotated[
        int | None, typer.Option("--num-ctx", help="num_ctx to write (default: the model's, at most 4096).")
    ] = None,
) -> None:
    """Write a verified Modelfile for a GGUF (--gguf), or validate one (--check)."""
    from exporter.core.errors import InputError
    from exporter.deploy.modelfile_check import parse_modelfile

    if (check is None) == (gguf is None):
        raise InputError("Pass exactly one of --gguf MODEL.gguf (write a Modelfile) or --check MODELFILE.")
    if gguf is not None:
        from exporter.commands.modelfile import modelfile_for_gguf

        check, spec = modelfile_for_gguf(gguf, out, num_ctx)
        console.print(
            f"wrote {check}: template {spec.family}, verified on {spec.verified_conversations} conversations, "
            f"stops {', '.join(spec.stops)}",
            highlight=False,
        )
        if spec.note:
            console.print(f"note: {spec.note}", highlight=False)
    assert check is not None
    if not check.is_file():
        raise InputError(f"The Modelfile {check} does not exist.")
    instructions, problems = parse_modelfile(check)
    if problems:
        for problem in problems:
            err_console.print(f"[red]FAIL[/] {check}: {problem}", highlight=False)
        raise typer.Exit(1)
    console.print(f"OK   {check}: {len(instructions)} instructions, valid for Ollama", highlight=False)


app.command("batch")(batch_command)

cache_app = typer.Typer(help="The stage cache: merged models, GGUFs, references and quality results.")
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls_command() -> None:
    """List the cached stages with their size and age."""
    import time

    from exporter.core.paths import cache_root
    from exporter.engine.stage_cache import StageCache

    cache = StageCache(cache_root())
    entries = cache.entries()
    table = Table(title=f"stage cache: {cache.root}")
    for column in ("stage", "key", "size", "age", "what"):
        table.add_column(column, justify="right" if column in ("size", "age") else "left")
    total = 0
    for entry in entries:
        size = entry.size_bytes
        total += size
        age_hours = (time.time() - entry.meta.get("created", time.time())) / 3600
        what = entry.meta.get("what", "")
        table.add_row(entry.kind, entry.key[:12], human_size(size), f"{age_hours:.1f} h", what)
    console.print(table)
    console.print(f"{len(entries)} entries, {human_size(total)}")


@cache_app.command("prune")
def cache_prune_command(
    older_than: Annotated[
        float | None, typer.Option("--older-than", help="Only entries older than this many days.")
    ] = None,
) -> None:
    """Remove cached stages (all, or those older than --older-than days) and leftovers of interrupted runs."""
    from exporter.core.paths import cache_root
    from exporter.engine.stage_cache import StageCache

    removed, freed = StageCache(cache_root()).prune(older_than)
    console.print(f"removed {removed} entries, freed {human_size(freed)}")


@app.command("profiles")
def profiles_command(
    profile_file: Annotated[
        list[Path], typer.Option("--profile-file", help="Also show these profile files.")
    ] = [],  # noqa: B006
) -> None:
    """List the quantization profiles."""
    from exporter.inputs.options import ProfileOptions
    from exporter.inputs.profiles import resolve_profiles

    registry, _ = resolve_profiles(ProfileOptions(names=(), files=tuple(profile_file)))
    table = Table()
    for column in ("profile", "aliases", "bits/weight", "max mean KLD", "min top-1", "description"):
        table.add_column(column)
    for p in registry.profiles:
        table.add_row(
            p.name,
            ", ".join(p.aliases),
            f"{p.bits_per_weight:.2f}",
            f"{p.gates.max_mean_kld:g}",
            f"{p.gates.min_top1:.0%}",
            p.description + (" [imatrix]" if p.needs_imatrix else ""),
        )
    console.print(table)


@app.command("doctor")
def doctor_command() -> None:
    """Check Python, packages, the llama.cpp build and converter, disk, RAM and CPU."""
    from exporter.commands.doctor import run_checks

    checks = run_checks(Path.cwd())
    for check in checks:
        status = "[green]OK  [/]" if check.ok else "[red]FAIL[/]"
        fix = f" — fix: {check.fix}" if not check.ok and check.fix else ""
        console.print(f"{status} {check.name}: {check.detail}{fix}", highlight=False)
    if not all(c.ok for c in checks):
        raise typer.Exit(BAD_INPUT_EXIT)  # a broken setup, like bad input: 1 is kept for failed checks


def main() -> None:
    """Console-script entry point: run the app, turning ExportError into a message and an exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # With standalone_mode=False, click returns the code of a typer.Exit instead of exiting.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except ExportError as exc:
        if STATE["debug"]:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: nothing half-written was left behind")
        sys.exit(INTERRUPTED_EXIT)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(INTERRUPTED_EXIT)
    except Exception as exc:  # click usage errors and the unexpected
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        # Never 1: CI scripts read 1 as "a quality gate failed".
        if STATE["debug"]:
            err_console.print_exception()
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {exc} — a bug in edge-export, not in your "
            "inputs; please report it with the output of --debug"
        )
        sys.exit(INTERNAL_ERROR_EXIT)
