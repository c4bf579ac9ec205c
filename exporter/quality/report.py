"""Quality reports of both kinds: a merged export's report.json (machine-readable), report.md (a model
card) and quality.png; and runtime-lora's report.json and report.md (each adapter on each profile,
beside its merged export when one was built).

The plot shows the trade-off a user chooses from: file size against mean KL divergence from the
unmerged fine-tune, one point per profile, with the base model (adapter removed) as a floor.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from converters.footprint import gguf_footprint
from exporter.core.atomic import atomic_target, write_text_atomic
from exporter.core.units import mib
from exporter.inputs.options import QualityOptions
from exporter.qlora.report import merge_base_markdown
from exporter.quality.fit_report import fit_markdown
from exporter.quality.reference import ArtifactQuality, PairQuality, Reference
from exporter.quality.vision import image_table, runtime_image_lines

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT = "quality.png"
REPORT_FILES = (REPORT_JSON, REPORT_MD, PLOT)
RUNTIME_REPORT_FILES = (REPORT_JSON, REPORT_MD)


def _row(item: ArtifactQuality, root: Path, context: int | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "label": item.label,
        "path": (
            item.path.relative_to(root).as_posix()
            if item.path and item.path.is_relative_to(root)
            else (str(item.path) if item.path else None)
        ),
        "size_bytes": item.size_bytes,
        "bits_per_weight": item.bits_per_weight,
        "metrics": item.metrics,
        "gates": [asdict(g) for g in item.gates],
        "passed": item.passed,
    }
    if item.path is not None and item.path.suffix == ".gguf" and item.path.is_file():
        record["footprint"] = asdict(gguf_footprint(item.path, context))
    return record


def memory_text(footprint: dict[str, Any] | None) -> str:
    """A row's memory at its context, e.g. "312 MiB @ 8192" (≤ where sliding-window layers make it a bound)."""
    if not footprint or footprint.get("kv_bytes") is None:
        return "–"
    total = footprint["weights_bytes"] + footprint["kv_bytes"]
    bound = "≤ " if footprint.get("sliding_upper_bound") else ""
    return f"{bound}{mib(total)} @ {footprint['context']}"


def report_data(
    name: str,
    out: Path,
    reference: Reference,
    options: QualityOptions,
    items: list[ArtifactQuality],
    floor: ArtifactQuality,
    sources: dict[str, Any],
) -> dict[str, Any]:
    return {
        "format": "edge-export/report/1",
        "name": name,
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sources": sources,
        "reference": {
            "model": f"base + adapter(s), unmerged, PEFT, {options.reference_dtype} on {options.device}",
            "eval_data": reference.eval.source,
            "scored_tokens": reference.eval.n_scored,
            "sequences": len(reference.eval.sequences),
            "greedy_prompts": len(reference.eval.prompts),
            "max_new_tokens": options.max_new_tokens,
            "greedy_answers": reference.greedy_how,
            "cache_key": reference.key,
            "from_cache": reference.cached,
            "seconds": reference.seconds,
        },
        "artifacts": [_row(item, out, options.context) for item in items],
        "base_floor": _row(floor, out),
        "passed": all(item.passed for item in items),
    }


def write_reports(out: Path, data: dict[str, Any]) -> list[Path]:
    """Write report.json, report.md and quality.png into `out` (each atomically)."""
    written = []
    target = out / REPORT_JSON
    write_text_atomic(target, json.dumps(data, indent=2) + "\n")
    written.append(target)
    plot = out / PLOT
    if _plot(data, plot):
        written.append(plot)
    target = out / REPORT_MD
    write_text_atomic(target, render_markdown(data, plot.name if plot.exists() else None))
    written.append(target)
    return written


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    """What could not be evaluated, and how an unquantized file's distance splits (its 16-bit floor)."""
    notes = []
    for row in rows:
        metrics = row["metrics"]
        if metrics.get("error"):
            notes.append(f"- {row['label']} could not be evaluated: {metrics['error']}")
        floor = metrics.get("rounding_floor")
        if isinstance(floor, dict) and "mean_kld" in floor:
            total = metrics["mean_kld"]
            notes.append(
                f"- {row['label']}: of its mean KLD {total:.3g}, rounding the merged weights to 16 bits costs "
                f"{floor['mean_kld']:.3g} (the merged folder scored in PyTorch: the 16-bit floor) and the "
                f"conversion and llama.cpp's runtime {max(total - floor['mean_kld'], 0.0):.3g}."
            )
        elif isinstance(floor, dict):
            notes.append(f"- {row['label']}: the 16-bit floor was not measured: {floor.get('skipped')}")
    return notes


# The report's glossary of its columns.
GLOSSARY = [
    "## What the numbers mean",
    "",
    "- **mean KLD**: KL divergence of the artifact's next-token distribution from the unmerged model's "
    "(base + adapter in PyTorch), averaged over every scored token, with its standard error. 0 is identical.",
    "- **top-1**: how often both pick the same most likely next token.",
    "- **ln(PPL ratio)**: ln(PPL of the artifact / PPL of the reference) on the evaluation text, with its "
    "uncertainty from the paired per-token differences; near 0 is good in either direction.",
    "- **greedy match**: share of prompts whose greedy continuation is token-for-token the reference's "
    "(the unmerged model's own; how they were found is on the evaluation-data line). Each GGUF decodes its own "
    "in llama.cpp; the base row's is "
    "read teacher-forced: the base fed the reference's continuation, its top token compared at every step "
    "(the same first divergence as decoding it, without a second decode).",
    "- **adapter effect kept**: 1 − KLD(artifact) / KLD(base without adapter). 100% means the fine-tune's "
    "change survived export completely; 0% means the artifact is as far from the fine-tune as the base is.",
    "- **memory**: what running the file takes at the context given (--context; default the model's trained "
    "context, at most 8192): the weights as stored plus llama.cpp's float16 KV cache for that many tokens "
    "(its compute buffers come on top). **prompt / gen tok/s**: llama.cpp's speed on this machine while "
    "scoring (prompt processing) and decoding the greedy answers.",
    "- The last row is the base model without the adapter, as a floor.",
    "",
]


def render_markdown(data: dict[str, Any], plot: str | None) -> str:
    reference = data["reference"]
    sources = data["sources"]
    lines = [
        f"# {data['name']}",
        "",
        f"Exported by edge-export {sources.get('tools', {}).get('edge-export', '?')} on {data['created_utc']} "
        f"with llama.cpp {str(sources.get('tools', {}).get('llama.cpp', '?'))[:9]}.",
        "",
        f"- Base model: `{sources.get('base', '?')}`",
        *[f"- Adapter: `{a['path']}` (weight {a['weight']})" for a in sources.get("adapters", [])],
        f"- Quality reference: {reference['model']}",
        f"- Evaluation data: {reference['eval_data']} — {reference['scored_tokens']} scored tokens in "
        f"{reference['sequences']} sequences, {reference['greedy_prompts']} greedy prompts of up to "
        f"{reference['max_new_tokens']} tokens ({reference['greedy_answers']})",
        "",
        "## Quality against the unmerged fine-tune",
        "",
        "| profile | file | size | bits/weight | memory | prompt tok/s | gen tok/s | mean KLD | top-1 | ln(PPL ratio) "
        "| greedy match | adapter effect kept | gates |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in [*data["artifacts"], data["base_floor"]]:
        m = row["metrics"]
        gates = (
            "pass"
            if row["passed"]
            else "**FAIL** "
            + ", ".join(
                f"{g['gate']} {_fmt(g['value'], '.4g')} vs {g['limit']:g}"
                for g in row["gates"]
                if not g["passed"]
            )
        )
        if not row["gates"]:
            gates = "–"
        kld = (
            f"{_fmt(m.get('mean_kld'), '.5f')} ± {_fmt(m.get('mean_kld_se'), '.5f')}"
            if "mean_kld" in m
            else "–"
        )
        lnppl = (
            f"{_fmt(m.get('ln_ppl_ratio'), '+.4f')} ± {_fmt(m.get('ln_ppl_ratio_se'), '.4f')}"
            if "ln_ppl_ratio" in m
            else "–"
        )
        lines.append(
            f"| {row['label']} | {Path(row['path']).name if row['path'] else '–'} | "
            f"{mib(row['size_bytes']) if row['size_bytes'] else '–'} | {_fmt(row['bits_per_weight'], '.2f')} | "
            f"{memory_text(row.get('footprint'))} | {_fmt(m.get('eval_tokens_per_s'), '.0f')} | "
            f"{_fmt(m.get('generate_tokens_per_s'), '.0f')} | {kld} | {_fmt(m.get('top1'), '.2%')} | {lnppl} | {_fmt(m.get('greedy_match'), '.0%')} | "
            f"{_fmt(m.get('adapter_effect_kept'), '.1%')} | {gates} |"
        )
    lines += image_table(data)
    lines += ["", *_notes(data["artifacts"])]
    if plot:
        lines += ["", f"![size against mean KL divergence]({plot})", ""]
    if "merge_base" in data:
        lines += merge_base_markdown(data["merge_base"])
    if "fit" in data:
        lines += fit_markdown(data)
    lines += GLOSSARY
    return "\n".join(lines)


def _point_label(row: dict[str, Any]) -> str:
    """A plotted artifact: its profile and llama.cpp's generation speed on this machine."""
    speed = row["metrics"].get("generate_tokens_per_s")
    return row["label"] if speed is None else f"{row['label']} ({speed:.0f} tok/s)"


def _plot(data: dict[str, Any], target: Path) -> bool:
    points = [
        (row["size_bytes"] / 2**20, row["metrics"].get("mean_kld"), _point_label(row))
        for row in data["artifacts"]
        if row["size_bytes"] and row["metrics"].get("mean_kld") is not None
    ]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = data["base_floor"]["metrics"].get("mean_kld")
    points.sort()
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=110)
    sizes = [p[0] for p in points]
    klds = [max(p[1], 1e-7) for p in points]
    fitted = data.get("fit", {}).get("profile")
    uniform = [
        (s, k) for s, k, p in zip(sizes, klds, points, strict=True) if not p[2].startswith(str(fitted))
    ]
    axes.plot([u[0] for u in uniform], [u[1] for u in uniform], "-o", color="#2b6cb0")
    for size, kld, label in zip(sizes, klds, [p[2] for p in points], strict=True):
        if fitted and label.startswith(fitted):
            axes.plot([size], [kld], "*", color="#dd6b20", markersize=14)
        axes.annotate(label, (size, kld), textcoords="offset points", xytext=(6, 6), fontsize=9)
    if fitted:
        budget = data["fit"]["budget_bytes"] / 2**20
        axes.axvline(budget, color="#dd6b20", linestyle=":", linewidth=1.2)
        axes.annotate(
            f"budget {budget:.0f} MiB",
            (budget, 0.03),
            xycoords=("data", "axes fraction"),
            xytext=(-4, 0),
            textcoords="offset points",
            fontsize=8,
            color="#dd6b20",
            rotation=90,
            ha="right",
            va="bottom",
        )
    if floor:
        axes.axhline(floor, color="#c53030", linestyle="--", linewidth=1)
        axes.annotate(
            "base without adapter",
            (sizes[0], floor),
            textcoords="offset points",
            xytext=(0, -14),
            fontsize=8,
            color="#c53030",
        )
    axes.set_yscale("log")
    axes.set_xlabel("file size (MiB)")
    axes.set_ylabel("mean KL divergence from the fine-tune (log)")
    axes.set_title(f"{data['name']}: size against quality")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    with atomic_target(target) as partial:
        figure.savefig(partial)
    plt.close(figure)
    return True


COMPARED = ("mean_kld", "top1", "generate_tokens_per_s")


def write_runtime_reports(
    out: Path, base_name: str, pairs: list[PairQuality], floors: dict[str, dict[str, Any]]
) -> list[Path]:
    """report.json (every metric of every pair, merged beside runtime) and report.md (the comparison)."""
    rows = [
        {
            "adapter": q.adapter,
            "profile": q.profile,
            "runtime": {
                "size_bytes": q.runtime.size_bytes,
                "metrics": q.runtime.metrics,
                "gates": [asdict(g) for g in q.runtime.gates],
                "gates_passed": q.passed,
            },
            "merged": None
            if q.merged is None
            else {"size_bytes": q.merged.size_bytes, "metrics": q.merged.metrics},
        }
        for q in pairs
    ]
    data = {
        "format": "edge-export/runtime-lora-report/1",
        "base": base_name,
        "pairs": rows,
        "base_floor": floors,
        "passed": all(q.passed for q in pairs),
    }
    json_path, md_path = out / REPORT_JSON, out / REPORT_MD
    write_text_atomic(json_path, json.dumps(data, indent=2) + "\n")
    write_text_atomic(md_path, runtime_report_markdown(base_name, pairs, floors))
    return [json_path, md_path]


def runtime_report_markdown(
    base_name: str, pairs: list[PairQuality], floors: dict[str, dict[str, Any]]
) -> str:
    lines = [
        f"# {base_name}: runtime LoRA adapters",
        "",
        "Each adapter runs as a GGUF LoRA on the quantized base (llama.cpp runtime LoRA, as Ollama's ADAPTER), "
        "checked against the unmerged fine-tune (base + adapter in PyTorch). Where merge-then-quantize was "
        "built too, it is shown beside it. Size is what one deployment needs on disk: base + adapter for the "
        "runtime path (the base is shared by every adapter), the merged GGUF otherwise.",
        "",
        "| adapter | profile | path | size | mean KLD | top-1 | generation tok/s | gates |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for q in pairs:
        r = q.runtime.metrics
        status = "evaluation failed" if "error" in r else ("pass" if q.passed else "FAIL")
        lines.append(
            f"| {q.adapter} | {q.profile} | runtime | {mib(q.runtime.size_bytes)} | {_fmt(r.get('mean_kld'), '.5f')} "
            f"| {_fmt(r.get('top1'), '.1%')} | {_fmt(r.get('generate_tokens_per_s'), '.0f')} | {status} |"
        )
        if q.merged is not None:
            m = q.merged.metrics
            lines.append(
                f"| {q.adapter} | {q.profile} | merged | {mib(q.merged.size_bytes)} "
                f"| {_fmt(m.get('mean_kld'), '.5f')} | {_fmt(m.get('top1'), '.1%')} "
                f"| {_fmt(m.get('generate_tokens_per_s'), '.0f')} | |"
            )
    lines += ["", "Base model without any adapter (the floor), per adapter's reference:", ""]
    for name, floor in floors.items():
        lines.append(
            f"- {name}: mean KLD {_fmt(floor.get('mean_kld'), '.5f')}, top-1 {_fmt(floor.get('top1'), '.1%')}"
            + (f"; on the image rows {floor['image_mean_kld']:.3g}" if "image_mean_kld" in floor else "")
        )
    lines += runtime_image_lines(pairs)
    return "\n".join(lines) + "\n"
