"""The edge-export command line: parse options, call the pipeline, map errors to exit codes.

There is deliberately no bare `export` command: `export` is a shell builtin.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from exporter.errors import BAD_INPUT_EXIT, INTERNAL_ERROR_EXIT, INTERRUPTED_EXIT, ExportError

if TYPE_CHECKING:
    from exporter.pipeline import QualitySummary
    from exporter.quality import QualityOptions

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


AdapterOption = Annotated[
    list[str],
    typer.Option(
        "--adapter", help="PEFT adapter folder; DIR:WEIGHT adds it with a weight. Repeat to merge several."
    ),
]
BaseOption = Annotated[
    str | None,
    typer.Option(
        "--base",
        help="Base model folder or Hugging Face id (local cache only). "
        "Default: base_model_name_or_path from adapter_config.json.",
    ),
]
AllowPickleOption = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Accept a pickle adapter_model.bin (loaded with weights_only=True)."),
]
EvalDataOption = Annotated[
    Path | None,
    typer.Option(
        "--eval-data",
        help='Evaluation text (.txt) or chat JSONL ({"messages": [...]}); default: built-in set.',
    ),
]
ReferenceDtypeOption = Annotated[
    str | None,
    typer.Option(
        "--reference-dtype",
        help="dtype of the unmerged PyTorch reference: float32 (default) or bfloat16 "
        "(chosen automatically when --max-memory needs it and this is not given).",
    ),
]
MaxMemoryOption = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Memory budget, e.g. 4GB: stay under it (a bfloat16 reference if need be) or stop before any work.",
    ),
]
ReferenceDeviceOption = Annotated[
    str,
    typer.Option("--reference-device", help="Device of the PyTorch reference: cpu, or mps on Apple silicon."),
]
DeviceOption = Annotated[
    str,
    typer.Option("--device", help="Where GGUFs are evaluated: cpu, or metal where llama-cpp-python has it."),
]
GateOption = Annotated[
    list[str],
    typer.Option(
        "--gate",
        help="Override a quality gate: KEY=VALUE or PROFILE:KEY=VALUE "
        "(max_mean_kld, min_top1, max_ln_ppl_ratio, min_greedy_match, min_adapter_effect_kept).",
    ),
]


def _quality_options(
    eval_data: Path | None,
    dtype: str | None,
    device: str,
    gates: list[str],
    threads: int | None,
    gguf_device: str,
) -> QualityOptions:
    from exporter.quality import QualityOptions

    if gguf_device not in ("cpu", "metal"):
        raise typer.BadParameter(f"--device {gguf_device!r}: use cpu or metal")
    return QualityOptions(
        eval_data=eval_data,
        reference_dtype=dtype or "float32",
        device=device,
        gates=tuple(gates),
        threads=threads,
        gguf_device=gguf_device,
    )


@contextmanager
def _progress(first: str) -> Iterator[Callable[[str], None]]:
    """A status line that shows the current stage, and a log line per stage."""
    with console.status(first) as status:

        def report(message: str) -> None:
            status.update(message)
            console.log(message)

        yield report


def _fmt(value: object, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _print_quality(summary: QualitySummary) -> None:
    table = Table(title="quality against the unmerged fine-tune (base + adapter in PyTorch)")
    for column in (
        "artifact",
        "size",
        "mean KLD",
        "p99 KLD",
        "top-1",
        "ln PPL ratio",
        "greedy",
        "effect kept",
        "gates",
    ):
        table.add_column(column, justify="left" if column in ("artifact", "gates") else "right")
    for item in [*summary.items, summary.floor]:
        m = item.metrics
        if "error" in m:
            table.add_row(
                item.label,
                _human_size(item.size_bytes),
                "[red]evaluation failed[/]",
                "",
                "",
                "",
                "",
                "",
                "[red]FAIL[/]",
            )
            continue
        status = "" if not item.gates else ("[green]pass[/]" if item.passed else "[red]FAIL[/]")
        table.add_row(
            item.label,
            _human_size(item.size_bytes) if item.size_bytes else "–",
            _fmt(m.get("mean_kld"), ".5f"),
            _fmt(m.get("p99_kld"), ".4f"),
            _fmt(m.get("top1"), ".1%"),
            _fmt(m.get("ln_ppl_ratio"), "+.4f"),
            _fmt(m.get("greedy_match"), ".0%"),
            _fmt(m.get("adapter_effect_kept"), ".1%"),
            status,
        )
    console.print(table)
    for path in summary.reports:
        console.print(f"report: {path}")
    failed = summary.failed_gates
    if failed:
        failures = Table(title="[red]failed quality gates[/]")
        for column in ("artifact", "gate", "limit", "value", "by"):
            failures.add_column(column)
        for gate in failed:
            by = "" if gate.value is None else f"{abs(gate.value - gate.limit):.4g}"
            failures.add_row(gate.profile, gate.gate, f"{gate.limit:g}", _fmt(gate.value, ".4g"), by)
        err_console.print(failures)
        from exporter.quality import gate_diagnosis

        for label in dict.fromkeys(gate.profile for gate in failed):
            diagnosis = gate_diagnosis(label)
            if diagnosis:
                err_console.print(f"[bold red]{label}:[/] {diagnosis}", highlight=False)


@app.command("merge-quantize")
def merge_quantize_command(
    adapter: AdapterOption,
    out: Annotated[
        Path, typer.Option("--out", help="Output folder for GGUFs, Modelfiles and manifest.json.")
    ],
    profile: Annotated[
        list[str],
        typer.Option(
            "--profile", help="Quantization profile (see `edge-export profiles`). Repeat for several."
        ),
    ] = ["Q4_K_M"],  # noqa: B006
    base: BaseOption = None,
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
    threads: Annotated[
        int | None, typer.Option("--threads", help="Threads per quantization (default: all cores, for each).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier export in --out.")] = False,
    allow_pickle: AllowPickleOption = False,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Check every GGUF against the unmerged reference.")
    ] = True,
    eval_data: EvalDataOption = None,
    reference_dtype: ReferenceDtypeOption = None,
    reference_device: ReferenceDeviceOption = "cpu",
    gate: GateOption = [],  # noqa: B006
    device: DeviceOption = "cpu",
    cache: Annotated[
        bool, typer.Option("--cache/--no-cache", help="Reuse and keep finished stages in the stage cache.")
    ] = True,
    rehash: Annotated[
        bool,
        typer.Option(
            "--rehash",
            help="Read every input and cached file to verify it, instead of trusting files whose inode, size and "
            "modification time are unchanged since they were hashed.",
        ),
    ] = False,
    jobs: Annotated[
        int,
        typer.Option("--jobs", min=1, help="Profiles quantized at once, each in its own process."),
    ] = 1,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="Text (.txt) or JSONL chats from the adapter's domain: compute an importance matrix on the "
            "merged model and quantize every profile with it (needed by IQ4_XS, IQ3_M).",
        ),
    ] = None,
    calibration_tokens: Annotated[
        int,
        typer.Option("--calibration-tokens", min=256, help="Most calibration tokens to read."),
    ] = 65536,
    imatrix: Annotated[
        Path | None,
        typer.Option(
            "--imatrix",
            help="An importance matrix computed earlier (an earlier run's <name>.imatrix.gguf, or llama-imatrix's "
            "GGUF output) to quantize with, instead of --calibration.",
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="Allow a base whose config.json has auto_map to run its own Python code.",
        ),
    ] = False,
    max_memory: MaxMemoryOption = None,
    no_wait: Annotated[
        bool,
        typer.Option(
            "--no-wait", help="Fail at once if another run holds --out or a cache entry, instead of waiting."
        ),
    ] = False,
    lock_timeout: Annotated[
        float | None,
        typer.Option("--lock-timeout", min=0, help="Wait at most this many seconds for another run's locks."),
    ] = None,
) -> None:
    """Merge the adapter into its base, convert to GGUF, quantize to each profile and check the quality."""
    from exporter.adapter import parse_adapter_argument
    from exporter.locks import LockPolicy
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
        check=check,
        quality=_quality_options(eval_data, reference_dtype, reference_device, gate, threads, device),
        use_cache=cache,
        rehash=rehash,
        jobs=jobs,
        calibration=calibration,
        calibration_tokens=calibration_tokens,
        imatrix=imatrix,
        trust_remote_code=trust_remote_code,
        lock=LockPolicy(wait=not no_wait, timeout=lock_timeout),
        max_memory=_parse_size(max_memory) if max_memory else None,
        reference_dtype_fixed=reference_dtype is not None,
    )
    with _progress("starting") as report:
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
    if result.imatrix:
        info = result.imatrix.result
        source = (
            f"given: {result.imatrix.calibration}, computed on {result.imatrix.dataset}"
            if result.imatrix.given
            else f"{info['tokens']} tokens in {info['chunks']} chunks of {result.imatrix.calibration.name}"
        )
        console.print(
            f"importance matrix: {result.imatrix.output.name} ({info['entries']} tensors, {source})"
        )
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"Modelfiles: {', '.join(m.name for m in result.modelfiles)}")
    console.print(f"manifest: {result.manifest}")
    if result.quality:
        _print_quality(result.quality)
        if not result.quality.passed:
            raise typer.Exit(1)


@app.command("runtime-lora")
def runtime_lora_command(
    adapter: Annotated[
        list[str], typer.Option("--adapter", help="PEFT LoRA adapter folder. Repeat for several on one base.")
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="Output folder for the base GGUFs, adapter GGUFs, Modelfiles, manifest."),
    ],
    profile: Annotated[
        list[str], typer.Option("--profile", help="Quantization profile of the base. Repeat for several.")
    ] = ["Q4_K_M"],  # noqa: B006
    base: BaseOption = None,
    name: Annotated[str | None, typer.Option("--name", help="Base model name used in file names.")] = None,
    profile_file: Annotated[
        list[Path], typer.Option("--profile-file", help="Extra profile definitions (TOML).")
    ] = [],  # noqa: B006
    threads: Annotated[int | None, typer.Option("--threads", help="Threads for quantizing.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier export in --out.")] = False,
    allow_pickle: AllowPickleOption = False,
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
    eval_data: EvalDataOption = None,
    reference_dtype: ReferenceDtypeOption = "float32",
    reference_device: ReferenceDeviceOption = "cpu",
    gate: GateOption = [],  # noqa: B006
    device: DeviceOption = "cpu",
    cache: Annotated[
        bool, typer.Option("--cache/--no-cache", help="Reuse and keep finished stages in the stage cache.")
    ] = True,
) -> None:
    """Quantize the unmerged base once per profile and convert each adapter to a GGUF LoRA on it."""
    from exporter.runtime_lora import RuntimeLoraOptions, runtime_lora

    options = RuntimeLoraOptions(
        adapters=tuple(Path(a) for a in adapter),
        profiles=tuple(profile),
        out=out,
        base=base,
        name=name,
        profile_files=tuple(profile_file),
        threads=threads,
        force=force,
        allow_pickle=allow_pickle,
        check=check,
        compare_merged=compare_merged,
        quality=_quality_options(eval_data, reference_dtype, reference_device, gate, threads, device),
        use_cache=cache,
    )
    with _progress("starting") as report:
        result = runtime_lora(options, report=report)
    table = Table(title=f"{result.base_name} + {len(result.adapters)} adapter(s) → {result.out}")
    for column in ("file", "what", "size", "sha256"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for profile_name, path in result.bases.items():
        table.add_row(path.name, f"base, {profile_name}", _human_size(path.stat().st_size), "")
    for item in result.adapters:
        what = f"GGUF LoRA; scale correction: {item.correction.corrected_modules} modules"
        table.add_row(item.gguf.name, what, _human_size(item.size_bytes), item.sha256[:12])
    console.print(table)
    stages = ", ".join(f"{stage} {secs:.1f}s" for stage, secs in result.stage_seconds.items())
    console.print(f"stages: {stages}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"Modelfiles: {', '.join(m.name for m in result.modelfiles)}")
    console.print(f"manifest: {result.manifest}")
    if result.quality:
        quality = Table(title="runtime adapter vs merge-then-quantize, against the unmerged fine-tune")
        for column in ("adapter", "profile", "path", "size", "mean KLD", "top-1", "gen tok/s", "gates"):
            quality.add_column(
                column, justify="left" if column in ("adapter", "profile", "path", "gates") else "right"
            )
        for q in result.quality:
            r = q.runtime
            status = (
                "[red]evaluation failed[/]"
                if "error" in r
                else ("[green]pass[/]" if q.passed else "[red]FAIL[/]")
            )
            quality.add_row(
                q.adapter,
                q.profile,
                "runtime",
                _human_size(q.runtime_size),
                _fmt(r.get("mean_kld"), ".5f"),
                _fmt(r.get("top1"), ".1%"),
                _fmt(r.get("generate_tokens_per_s"), ".0f"),
                status,
            )
            if q.merged is not None:
                m = q.merged
                quality.add_row(
                    "",
                    "",
                    "merged",
                    _human_size(q.merged_size or 0),
                    _fmt(m.get("mean_kld"), ".5f"),
                    _fmt(m.get("top1"), ".1%"),
                    _fmt(m.get("generate_tokens_per_s"), ".0f"),
                    "",
                )
        console.print(quality)
        for path in result.reports:
            console.print(f"report: {path}")
        if not result.passed:
            raise typer.Exit(1)


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a size; write e.g. 2GB, 500MB or 1000000")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


@app.command("merge")
def merge_command(
    adapter: AdapterOption,
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged Hugging Face model.")],
    base: BaseOption = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="float16, bfloat16 or float32 (default: the base's).")
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 2GB or 500MB.")
    ] = "2GB",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out folder.")] = False,
    allow_pickle: AllowPickleOption = False,
    max_memory: MaxMemoryOption = None,
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
        max_memory=_parse_size(max_memory) if max_memory else None,
    )
    start = time.perf_counter()
    with _progress("merging") as report:
        result = merge_model(options, report=report)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in result.path.glob("*.safetensors"))
    console.print(
        f"merged {result.merged_tensors} of {result.total_tensors} tensors into {result.path} "
        f"({result.dtype}, {result.shards} shard(s), {_human_size(size)}) in {seconds:.1f}s"
        + ("; untied the embeddings (the adapter changes one side)" if result.untied_embeddings else "")
    )


@app.command("check")
def check_command(
    manifest: Annotated[Path, typer.Option("--manifest", help="The manifest.json merge-quantize wrote.")],
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", help="An earlier report.json to compare with (within tolerance)."),
    ] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML here for CI.")] = None,
    eval_data: EvalDataOption = None,
    reference_dtype: ReferenceDtypeOption = None,
    reference_device: ReferenceDeviceOption = "cpu",
    gate: GateOption = [],  # noqa: B006
    device: DeviceOption = "cpu",
    kld_tolerance: Annotated[
        float,
        typer.Option("--kld-tolerance", help="Allowed relative growth of mean KLD against the baseline."),
    ] = 0.10,
    top1_tolerance: Annotated[
        float, typer.Option("--top1-tolerance", help="Allowed absolute drop of top-1 against the baseline.")
    ] = 0.005,
    threads: Annotated[int | None, typer.Option("--threads", help="Threads for evaluation.")] = None,
    max_memory: MaxMemoryOption = None,
) -> None:
    """Re-check an export on CPU for CI: gates, an optional baseline, JUnit XML. Exit 1 on failure."""
    from exporter.pipeline import CheckOptions, check_manifest

    options = CheckOptions(
        manifest=manifest,
        baseline=baseline,
        junit=junit,
        quality=_quality_options(eval_data, reference_dtype, reference_device, gate, threads, device),
        kld_tolerance=kld_tolerance,
        top1_tolerance=top1_tolerance,
        max_memory=_parse_size(max_memory) if max_memory else None,
        reference_dtype_fixed=reference_dtype is not None,
    )
    with _progress("checking") as report:
        result = check_manifest(options, report=report)
    _print_quality(result.summary)
    if result.baseline:
        table = Table(title=f"against the baseline {baseline}")
        for column in ("artifact", "metric", "baseline", "now", "allowed", "status"):
            table.add_column(column)
        for c in result.baseline:
            table.add_row(
                c.label,
                c.metric,
                f"{c.baseline:.5g}",
                _fmt(c.current, ".5g"),
                f"{c.allowed:.5g}",
                "[green]pass[/]" if c.passed else "[red]FAIL[/]",
            )
        console.print(table)
    if result.junit:
        console.print(f"JUnit XML: {result.junit}")
    if not result.passed:
        raise typer.Exit(1)


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
    from exporter.errors import InputError
    from exporter.modelfile_check import parse_modelfile

    if (check is None) == (gguf is None):
        raise InputError("Pass exactly one of --gguf MODEL.gguf (write a Modelfile) or --check MODELFILE.")
    if gguf is not None:
        from exporter import __version__
        from exporter.modelfile import chat_spec_from_gguf, write_modelfile

        if not gguf.is_file():
            raise InputError(f"The GGUF {gguf} does not exist. Pass the path of a .gguf model file.")
        spec = chat_spec_from_gguf(gguf, num_ctx)
        check = out or gguf.with_suffix(".Modelfile")
        write_modelfile(check, gguf, spec, f"{gguf.stem}, written by edge-export {__version__}")
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


cache_app = typer.Typer(help="The stage cache: merged models, GGUFs, references and quality results.")
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls_command() -> None:
    """List the cached stages with their size and age."""
    import time

    from exporter.quality import cache_root
    from exporter.stage_cache import StageCache

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
        table.add_row(entry.kind, entry.key[:12], _human_size(size), f"{age_hours:.1f} h", what)
    references = (
        sorted((cache_root() / "reference").glob("*.npz")) if (cache_root() / "reference").is_dir() else []
    )
    for file in references:
        total += file.stat().st_size
        age_hours = (time.time() - file.stat().st_mtime) / 3600
        table.add_row(
            "reference",
            file.stem[:12],
            _human_size(file.stat().st_size),
            f"{age_hours:.1f} h",
            "unmerged model's log-probs",
        )
    console.print(table)
    console.print(f"{len(entries) + len(references)} entries, {_human_size(total)}")


@cache_app.command("prune")
def cache_prune_command(
    older_than: Annotated[
        float | None, typer.Option("--older-than", help="Only entries older than this many days.")
    ] = None,
) -> None:
    """Remove cached stages (all, or those older than --older-than days) and leftovers of interrupted runs."""
    import shutil
    import time

    from exporter.quality import cache_root
    from exporter.stage_cache import StageCache

    removed, freed = StageCache(cache_root()).prune(older_than)
    folder = cache_root() / "reference"
    if folder.is_dir():
        cutoff = None if older_than is None else time.time() - older_than * 86400
        for file in folder.iterdir():
            if cutoff is None or file.stat().st_mtime < cutoff:
                freed += file.stat().st_size
                removed += file.suffix == ".npz"
                file.unlink() if file.is_file() else shutil.rmtree(file)
    console.print(f"removed {removed} entries, freed {_human_size(freed)}")


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
