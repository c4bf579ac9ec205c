"""The edge-export command line: parse options, call the pipeline, map errors to exit codes.

There is deliberately no bare `export` command: `export` is a shell builtin.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from exporter.errors import ExportError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn a fine-tuned LoRA adapter into quantized GGUF models for laptops, phones and edge boxes.",
)


def _console(stderr: bool = False) -> Console:
    """A console that is 120 columns wide when writing to a file or pipe (rich would pick 80)."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 120
    return Console(stderr=stderr, width=width, log_path=False)


console = _console()
err_console = _console(stderr=True)
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


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024  # type: ignore[assignment]
    return str(size)


@app.command("merge-quantize")
def merge_quantize_command(
    adapter: Annotated[
        list[str],
        typer.Option(
            "--adapter",
            help="PEFT adapter folder; DIR:WEIGHT adds it with a weight. Repeat to merge several.",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Output folder for GGUFs, Modelfiles and manifest.json.")
    ],
    profile: Annotated[
        list[str],
        typer.Option(
            "--profile", help="Quantization profile (see `edge-export profiles`). Repeat for several."
        ),
    ] = ["Q4_K_M"],  # noqa: B006
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Base model folder or Hugging Face id (local cache only). "
            "Default: base_model_name_or_path from adapter_config.json.",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Model name used in file names.")] = None,
    profile_file: Annotated[
        list[Path],
        typer.Option(
            "--profile-file", help="Extra profile definitions (TOML, same schema as quant_profiles/)."
        ),
    ] = [],  # noqa: B006
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="dtype of the merged model: float16, bfloat16 (default: the base's)."),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Threads for quantization.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier export in --out.")] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle", help="Accept a pickle adapter_model.bin (loaded with weights_only=True)."
        ),
    ] = False,
) -> None:
    """Merge the adapter into its base, convert to GGUF and quantize to each profile."""
    from exporter.adapter import parse_adapter_argument
    from exporter.pipeline import ExportOptions, merge_quantize

    options = ExportOptions(
        adapters=tuple(parse_adapter_argument(a) for a in adapter),
        profiles=tuple(profile),
        out=out,
        base=base,
        name=name,
        profile_files=tuple(profile_file),
        dtype=dtype,
        threads=threads,
        force=force,
        allow_pickle=allow_pickle,
    )
    with console.status("starting") as status:

        def report(message: str) -> None:
            status.update(message)
            console.log(message)

        result = merge_quantize(options, report=report)
    table = Table(title=f"{result.name} → {result.out}")
    for column in ("profile", "file", "size", "bits/weight", "sha256", "seconds"):
        table.add_column(column, justify="right" if column in ("size", "bits/weight", "seconds") else "left")
    for artifact in result.artifacts:
        table.add_row(
            artifact.profile,
            artifact.path.name,
            _human_size(artifact.size_bytes),
            f"{artifact.bits_per_weight:.2f}",
            artifact.sha256[:12],
            f"{artifact.seconds:.1f}",
        )
    console.print(table)
    stages = ", ".join(f"{stage} {secs:.1f}s" for stage, secs in result.stage_seconds.items())
    console.print(f"stages: {stages}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"Modelfiles: {', '.join(m.name for m in result.modelfiles)}")
    console.print(f"manifest: {result.manifest}")


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a size; write e.g. 2GB, 500MB or 1000000")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


@app.command("merge")
def merge_command(
    adapter: Annotated[
        list[str],
        typer.Option(
            "--adapter",
            help="PEFT adapter folder; DIR:WEIGHT adds it with a weight. Repeat to merge several.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged Hugging Face model.")],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Base model folder or Hugging Face id (local cache only). "
            "Default: base_model_name_or_path from adapter_config.json.",
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="float16, bfloat16 or float32 (default: the base's).")
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 2GB or 500MB.")
    ] = "2GB",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out folder.")] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle", help="Accept a pickle adapter_model.bin (loaded with weights_only=True)."
        ),
    ] = False,
) -> None:
    """Merge adapters into the base and write the merged model as safetensors (no GGUF)."""
    import time

    from exporter.adapter import parse_adapter_argument
    from exporter.pipeline import MergeOptions, merge_model

    options = MergeOptions(
        adapters=tuple(parse_adapter_argument(a) for a in adapter),
        out=out,
        base=base,
        dtype=dtype,
        max_shard_bytes=_parse_size(max_shard_size),
        force=force,
        allow_pickle=allow_pickle,
    )
    start = time.perf_counter()
    with console.status("merging"):
        result = merge_model(options, report=console.log)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in result.path.glob("*.safetensors"))
    console.print(
        f"merged {result.merged_tensors} of {result.total_tensors} tensors into {result.path} "
        f"({result.dtype}, {result.shards} shard(s), {_human_size(size)}) in {seconds:.1f}s"
        + ("; untied the embeddings (the adapter changes one side)" if result.untied_embeddings else "")
    )


@app.command("profiles")
def profiles_command(
    profile_file: Annotated[
        list[Path], typer.Option("--profile-file", help="Also show these profile files.")
    ] = [],  # noqa: B006
) -> None:
    """List the quantization profiles."""
    from exporter.pipeline import resolve_profiles

    registry, _ = resolve_profiles((), tuple(profile_file))
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
    from exporter.doctor import run_checks

    checks = run_checks(Path.cwd())
    for check in checks:
        status = "[green]OK  [/]" if check.ok else "[red]FAIL[/]"
        fix = f" — fix: {check.fix}" if not check.ok and check.fix else ""
        console.print(f"{status} {check.name}: {check.detail}{fix}", highlight=False)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


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
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors and the unexpected
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        if STATE["debug"]:
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (run with --debug for the traceback)"
        )
        sys.exit(1)
