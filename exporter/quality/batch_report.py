"""A batch's report: one row per export × profile (file, size, sha256, mean KLD, gates, or what failed),
as batch-report.json, a Markdown table (batch-report.md), a plot of size against KLD (batch.png) and
JUnit XML for CI (batch-junit.xml: one test case per row)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from exporter.core.atomic import atomic_target, write_text_atomic
from exporter.core.units import mib

BATCH_JSON = "batch-report.json"
BATCH_MD = "batch-report.md"
BATCH_PLOT = "batch.png"
BATCH_JUNIT = "batch-junit.xml"
BATCH_SCHEDULE = "batch-schedule.jsonl"
BATCH_PLAN = "batch-plan.json"  # which plan wrote this out: running it again resumes


@dataclass(frozen=True)
class BatchRow:
    export: str  # the plan's export (its folder under out)
    kind: str  # merged | runtime
    adapter: str
    profile: str
    status: str  # ok | failed | skipped
    files: tuple[str, ...] = ()  # relative to the batch's out
    size_bytes: int | None = None
    sha256: tuple[str, ...] = ()
    mean_kld: float | None = None
    gates_passed: bool | None = None  # None: not checked
    detail: str = ""  # what failed, and at which stage

    @property
    def passed(self) -> bool:
        return self.status == "ok" and self.gates_passed is not False


def write_batch_reports(
    out: Path, plan: Path, rows: list[BatchRow], seconds: float, executor: str
) -> list[Path]:
    """Write the four reports into `out`; the paths written."""
    data: dict[str, Any] = {
        "plan": str(plan),
        "executor": executor,
        "seconds": round(seconds, 3),
        "passed": all(row.passed for row in rows),
        "rows": [asdict(row) for row in rows],
    }
    written = [out / BATCH_JSON, out / BATCH_MD]
    write_text_atomic(out / BATCH_JSON, json.dumps(data, indent=2) + "\n")
    plotted = _plot(rows, out / BATCH_PLOT)
    if plotted:
        written.append(out / BATCH_PLOT)
    write_text_atomic(out / BATCH_MD, batch_markdown(rows, plan, plotted))
    written.append(write_batch_junit(out / BATCH_JUNIT, rows))
    return written


def _size(n: int | None) -> str:
    return "–" if n is None else mib(n)


def batch_markdown(rows: list[BatchRow], plan: Path, plotted: bool) -> str:
    lines = [
        f"# Batch export: {plan.name}",
        "",
        "| export | adapter | profile | status | size | mean KLD | gates | sha256 | file |",
        "|---|---|---|---|---:|---:|---|---|---|",
    ]
    for row in rows:
        kld = "–" if row.mean_kld is None else f"{row.mean_kld:.5f}"
        gates = {None: "–", True: "pass", False: "FAIL"}[row.gates_passed]
        status = row.status if not row.detail else f"{row.status}: {row.detail}"
        lines.append(
            f"| {row.export} | {row.adapter} | {row.profile} | {status} | {_size(row.size_bytes)} | {kld} | "
            f"{gates} | {' + '.join(s[:12] for s in row.sha256) or '–'} | {' + '.join(row.files) or '–'} |"
        )
    if plotted:
        lines += ["", f"![size against mean KLD]({BATCH_PLOT})"]
    return "\n".join(lines) + "\n"


def _plot(rows: list[BatchRow], target: Path) -> bool:
    series: dict[str, list[tuple[float, float, str]]] = {}
    for row in rows:
        if row.size_bytes and row.mean_kld is not None:
            label = row.export if row.kind == "merged" else f"{row.export}: {row.adapter}"
            series.setdefault(label, []).append(
                (row.size_bytes / 2**20, max(row.mean_kld, 1e-7), row.profile)
            )
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for label, points in sorted(series.items()):
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], "-o", label=label)
        for size, kld, profile in points:
            axes.annotate(profile, (size, kld), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.set_yscale("log")
    axes.set_xlabel("file size (MiB; a runtime LoRA: base + adapter)")
    axes.set_ylabel("mean KL divergence from the fine-tune (log)")
    axes.set_title("every adapter × profile: size against quality")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_target(target) as partial:
        figure.savefig(partial, format="png")
    plt.close(figure)
    return True


def write_batch_junit(target: Path, rows: list[BatchRow]) -> Path:
    """One test case per export × profile: a failure when its stage failed or a quality gate did."""
    suite = ET.Element("testsuite", name="edge-export batch", tests=str(len(rows)))
    failures = 0
    for row in rows:
        case = ET.SubElement(
            suite, "testcase", classname=f"edge-export.{row.export}", name=f"{row.adapter} {row.profile}"
        )
        if row.passed:
            continue
        failures += 1
        message = row.detail or ("a quality gate failed" if row.gates_passed is False else row.status)
        ET.SubElement(case, "failure", message=message[:500]).text = message
    suite.set("failures", str(failures))
    root = ET.Element("testsuites")
    root.append(suite)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    with atomic_target(target) as partial:
        tree.write(partial, encoding="utf-8", xml_declaration=True)
    return target
