"""What the commands print: result tables, quality tables and failed gates (rich)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from exporter.core.units import human_size
from exporter.qlora.report import CANDIDATE_TITLES
from exporter.quality.reference import gate_diagnosis

if TYPE_CHECKING:
    from exporter.commands.check import CheckResult
    from exporter.commands.merge_quantize import ExportResult
    from exporter.commands.runtime_lora import RuntimeLoraResult
    from exporter.stages.quality import QualitySummary


def make_console(stderr: bool = False) -> Console:
    """A console that is 120 columns wide when writing to a file or pipe (rich would pick 80)."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 120
    return Console(stderr=stderr, width=width, log_path=False)


console = make_console()
err_console = make_console(stderr=True)


def _fmt(value: object, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def print_quality(summary: QualitySummary) -> None:
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
                human_size(item.size_bytes),
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
            human_size(item.size_bytes) if item.size_bytes else "–",
            _fmt(m.get("mean_kld"), ".5f"),
            _fmt(m.get("p99_kld"), ".4f"),
            _fmt(m.get("top1"), ".1%"),
            _fmt(m.get("ln_ppl_ratio"), "+.4f"),
            _fmt(m.get("greedy_match"), ".0%"),
            _fmt(m.get("adapter_effect_kept"), ".1%"),
            status,
        )
    console.print(table)
    _print_images(summary)
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
        metrics = {item.label: item.metrics for item in summary.items}
        for label in dict.fromkeys(gate.profile for gate in failed):
            diagnosis = gate_diagnosis(label, metrics.get(label))
            if diagnosis:
                err_console.print(f"[bold red]{label}:[/] {diagnosis}", highlight=False)


def _print_images(summary: QualitySummary) -> None:
    """A vision-language export's image rows: each GGUF with its projector, and the base."""
    rows = [
        item
        for item in [*summary.items, summary.floor]
        if {"image_mean_kld", "image_error"} & set(item.metrics)
    ]
    if not rows:
        return
    table = Table(title="with images (each GGUF + mmproj through libmtmd, answer tokens)")
    for column in ("artifact", "mean KLD", "top-1", "greedy", "tokens"):
        table.add_column(column, justify="left" if column == "artifact" else "right")
    for item in rows:
        m = item.metrics
        if "image_error" in m:
            table.add_row(item.label, "[red]evaluation failed[/]", "", "", "")
            continue
        table.add_row(
            item.label,
            _fmt(m.get("image_mean_kld"), ".2e"),
            _fmt(m.get("image_top1"), ".1%"),
            _fmt(m.get("image_greedy"), ".0%"),
            str(m.get("image_tokens", "")),
        )
    console.print(table)


def print_export(result: ExportResult) -> None:
    table = Table(title=f"{result.name} → {result.out}")
    for column in ("profile", "file", "size", "bits/weight", "sha256", "seconds"):
        table.add_column(column, justify="right" if column in ("size", "bits/weight", "seconds") else "left")
    for artifact in result.artifacts:
        table.add_row(
            artifact.profile,
            artifact.path.name,
            human_size(artifact.size_bytes),
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
    print_serve_configs(result.serve_configs)
    console.print(f"manifest: {result.manifest}")
    if result.quality:
        print_quality(result.quality)
    if result.merge_base:
        print_merge_base(result.merge_base)


def print_merge_base(section: dict[str, Any]) -> None:
    """A QLoRA export's merge-base candidates side by side, the choice, and what the second one cost."""
    table = Table(
        title="QLoRA merge base: each candidate against the model as trained and the 16-bit reference"
    )
    for column in (
        "candidate",
        "profile",
        "KLD vs as trained",
        "top-1 vs as trained",
        "KLD vs 16-bit",
        "eval loss",
        "kept",
    ):
        table.add_column(column, justify="left" if column in ("candidate", "profile", "kept") else "right")
    for row in section["candidates"]:
        table.add_row(
            CANDIDATE_TITLES[row["candidate"]],
            row["profile"],
            f"{row['kld_as_trained']:.5f}",
            f"{row['top1_as_trained']:.1%}",
            f"{row['kld_16bit']:.5f}",
            f"{row['eval_loss']:.4f}",
            "[green]kept[/]" if row["kept"] else "",
        )
    if section["candidates"]:
        console.print(table)
    console.print(f"merge base: {CANDIDATE_TITLES[section['chosen']]} — {section['reason']}")
    extra = section.get("second_candidate_seconds") or {}
    if extra:
        total = extra.get("total", sum(extra.values()))
        stages = ", ".join(f"{stage} {secs:.1f}s" for stage, secs in extra.items() if stage != "total")
        console.print(f"second candidate (dequant): {stages}; {total:.1f}s in all")


def print_serve_configs(configs: list[Path]) -> None:
    """Each llama-server config with the command it holds (run in the output folder)."""
    from exporter.deploy.serve_config import read_serve_config

    for config in configs:
        console.print(f"llama-server: {config.name}: {read_serve_config(config)['shell']}", highlight=False)


def print_runtime(result: RuntimeLoraResult) -> None:
    table = Table(title=f"{result.base_name} + {len(result.adapters)} adapter(s) → {result.out}")
    for column in ("file", "what", "size", "sha256"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for profile_name, path in result.bases.items():
        table.add_row(path.name, f"base, {profile_name}", human_size(path.stat().st_size), "")
    for item in result.adapters:
        what = f"GGUF LoRA; scale correction: {item.correction.corrected_modules} modules"
        table.add_row(item.gguf.name, what, human_size(item.size_bytes), item.sha256[:12])
    console.print(table)
    stages = ", ".join(f"{stage} {secs:.1f}s" for stage, secs in result.stage_seconds.items())
    console.print(f"stages: {stages}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    if result.modelfiles:
        console.print(f"Modelfiles: {', '.join(m.name for m in result.modelfiles)}")
    print_serve_configs(result.serve_configs)
    console.print(f"manifest: {result.manifest}")
    if result.quality:
        quality = Table(title="runtime adapter vs merge-then-quantize, against the unmerged fine-tune")
        for column in ("adapter", "profile", "path", "size", "mean KLD", "top-1", "gen tok/s", "gates"):
            quality.add_column(
                column, justify="left" if column in ("adapter", "profile", "path", "gates") else "right"
            )
        for q in result.quality:
            r = q.runtime.metrics
            status = (
                "[red]evaluation failed[/]"
                if "error" in r
                else ("[green]pass[/]" if q.passed else "[red]FAIL[/]")
            )
            quality.add_row(
                q.adapter,
                q.profile,
                "runtime",
                human_size(q.runtime.size_bytes),
                _fmt(r.get("mean_kld"), ".5f"),
                _fmt(r.get("top1"), ".1%"),
                _fmt(r.get("generate_tokens_per_s"), ".0f"),
                status,
            )
            if q.merged is not None:
                m = q.merged.metrics
                quality.add_row(
                    "",
                    "",
                    "merged",
                    human_size(q.merged.size_bytes),
                    _fmt(m.get("mean_kld"), ".5f"),
                    _fmt(m.get("top1"), ".1%"),
                    _fmt(m.get("generate_tokens_per_s"), ".0f"),
                    "",
                )
        console.print(quality)
        for path in result.reports:
            console.print(f"report: {path}")


def print_check(result: CheckResult, baseline: object) -> None:
    print_quality(result.summary)
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
