"""`edge-export check`: score a finished export again (for CI), against its gates and an optional
baseline report, with JUnit XML. The same reference and quality stages as merge-quantize."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from exporter.core.atomic import atomic_target
from exporter.core.errors import InputError
from exporter.core.hashing import hash_files, sha256_file
from exporter.engine.graph import LocalExecutor, Results, StageGraph
from exporter.engine.memory import fit_check
from exporter.engine.run import Reporter, Run, silent
from exporter.inputs.adapter import LoraAdapter, read_adapter
from exporter.inputs.manifest import Manifest
from exporter.inputs.options import CheckOptions, ProfileOptions
from exporter.inputs.profiles import resolve_profiles
from exporter.inputs.records import ModelInputs, input_files
from exporter.quality.reference import UNQUANTIZED_LABELS, ArtifactQuality, gate_diagnosis
from exporter.quality.vision import with_image_floor
from exporter.stages.images import image_reference_stage, with_image_scores
from exporter.stages.merge import MERGED_DIR
from exporter.stages.quality import QualitySummary, judged, reference_stage, score_stage, write_quality_report


@dataclass(frozen=True)
class BaselineComparison:
    label: str
    metric: str
    baseline: float
    current: float | None
    allowed: float
    passed: bool


@dataclass
class CheckResult:
    summary: QualitySummary
    baseline: list[BaselineComparison]
    junit: Path | None

    @property
    def passed(self) -> bool:
        return self.summary.passed and all(c.passed for c in self.baseline)


def verified_inputs(manifest: Manifest, source: Path) -> ModelInputs:
    """Every GGUF of the manifest unchanged, and the base and adapters it was exported from unchanged."""
    root = source.parent
    for record in manifest.scored_records:
        path = root / record["path"]
        if not path.is_file():
            raise InputError(f"{path}, listed in {source}, is missing. Re-run merge-quantize.")
        if sha256_file(path) != record["sha256"]:
            raise InputError(
                f"{path} has changed since {source} was written (its sha256 differs). Re-run "
                "merge-quantize to re-export, or restore the file."
            )
    inputs = manifest.inputs
    base_dir = Path(inputs["base"]["path"])
    # A pickle adapter is read again only if the export itself was allowed to read it.
    allow_pickle = bool(manifest.options.get("allow_pickle", False))
    adapters: list[LoraAdapter] = [
        read_adapter(Path(a["path"]), a["weight"], allow_pickle) for a in inputs["adapters"]
    ]
    folders = [(base_dir, inputs["base"]["files"])]
    folders += [(a.folder, r["files"]) for a, r in zip(adapters, inputs["adapters"], strict=True)]
    for folder, recorded in folders:
        if not folder.is_dir() or hash_files(input_files(folder), folder) != recorded:
            raise InputError(
                f"{folder} is not the input {source} was exported from (missing or changed files), so "
                "the reference would not be the fine-tune these GGUFs came from. Re-run merge-quantize."
            )
    return ModelInputs(
        base_dir,
        tuple(adapters),
        inputs["base"]["files"],
        tuple(r.get("read_as", r)["files"] for r in inputs["adapters"]),  # what the stages were keyed by
    )


def verified_file(path: Path, sha256: str, manifest: Path) -> Path:
    """A file the manifest lists beside it, with the hash recorded there."""
    if not path.is_file() or sha256_file(path) != sha256:
        raise InputError(
            f"{path} is missing or differs from the file {manifest} recorded (sha256 {sha256[:12]}…); restore it "
            "or export again."
        )
    return path


def check_manifest(options: CheckOptions, report: Reporter = silent) -> CheckResult:
    """Re-evaluate an export for CI: verify files, score against the reference, gates, baseline, JUnit."""
    manifest = Manifest.read(options.manifest)
    root = options.manifest.parent
    inputs = verified_inputs(manifest, options.manifest)
    merged = root / manifest.sections.get("merge", {}).get("path", MERGED_DIR)
    tokenizer_dir = merged if (merged / "tokenizer_config.json").is_file() else inputs.base_dir
    files = tuple(Path(p) for p in manifest.options.get("profile_files", []))
    fitted = manifest.sections.get("fit", {}).get("profile_file")
    if fitted:  # --fit's profile, written beside the manifest (with its gates)
        files = (*files, verified_file(root / fitted["path"], fitted["sha256"], options.manifest))
    registry, _ = resolve_profiles(ProfileOptions(names=(), files=files))
    quality = replace(options.quality, trust_remote_code=bool(manifest.options.get("trust_remote_code")))
    if options.run.max_memory:
        largest = max(r["size_bytes"] for r in manifest.scored_records)
        quality, estimates = fit_check(
            inputs.base_dir,
            list(inputs.adapters),
            quality,
            options.run.max_memory,
            quality.reference_dtype_fixed,
            largest,
        )
        report("memory: " + ", ".join(f"{e.stage} about {e.peak_bytes >> 20} MiB" for e in estimates))
    records = {r["profile"]: r for r in manifest.scored_records}
    # The reports are written into the export's folder, which is locked meanwhile like any output.
    with Run.open(root, options.run, report) as run:
        graph = StageGraph()
        # The export's 16-bit GGUF drafts the reference's greedy answers, as in merge-quantize.
        draft = next((root / r["path"] for label, r in records.items() if label in UNQUANTIZED_LABELS), None)
        reference = graph.add(
            "reference", lambda _: reference_stage(run, inputs, tokenizer_dir, quality, draft=draft)
        )
        # a vision-language export: its projector, verified, and the image rows scored with it too
        projector = manifest.sections.get("mmproj")
        mmproj = (
            None
            if projector is None
            else verified_file(root / projector["path"], projector["sha256"], options.manifest)
        )
        images = (
            None
            if mmproj is None
            else graph.add("reference:images", lambda _: image_reference_stage(run, inputs, quality))
        )

        def scorer(label: str) -> Callable[[Results], ArtifactQuality]:
            def score(r: Results) -> ArtifactQuality:
                record = records[label]
                path = root / record["path"]
                metrics = score_stage(run, f"quality:{label}", r[reference], path, record["sha256"], quality)
                if images is not None and mmproj is not None and projector is not None:
                    pair = (mmproj, projector["sha256"])
                    name, sha256 = f"quality:{label}", record["sha256"]
                    metrics = with_image_scores(run, name, metrics, r[images], path, sha256, pair, quality)
                size, bits = record["size_bytes"], record["bits_per_weight"]
                return judged(label, path, size, bits, metrics, registry.get(label), quality)

            return score

        needs = (reference, *([images] if images else []))
        scored = [graph.add(f"quality:{label}", scorer(label), needs) for label in records]
        results = Results(LocalExecutor(1).run(graph))
        items = sorted((results[node] for node in scored), key=lambda item: -item.size_bytes)
        seen_reference, extra = with_image_floor(results[reference], results.optional(images))
        summary = write_quality_report(run, manifest.name, inputs, seen_reference, quality, items, extra)
        run.guard.paths.clear()  # the reports replace the export's earlier ones: nothing to roll back
    comparisons = compare_with_baseline(summary, options) if options.baseline else []
    junit = write_junit(options.junit, summary, comparisons) if options.junit else None
    return CheckResult(summary, comparisons, junit)


def compare_with_baseline(summary: QualitySummary, options: CheckOptions) -> list[BaselineComparison]:
    """Each artifact's mean KLD and top-1 against an earlier report.json, within the tolerances."""
    assert options.baseline is not None
    try:
        baseline = json.loads(options.baseline.read_text())
        rows = {row["label"]: row["metrics"] for row in baseline["artifacts"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(
            f"The baseline {options.baseline} is not a report.json written by edge-export ({exc})."
        ) from exc
    comparisons = []
    for item in summary.items:
        old = rows.get(item.label)
        if old is None or "mean_kld" not in old:
            continue
        kld, top1 = item.metrics.get("mean_kld"), item.metrics.get("top1")
        kld_limit = old["mean_kld"] * (1 + options.kld_tolerance) + 1e-6
        top1_limit = old["top1"] - options.top1_tolerance
        comparisons += [
            BaselineComparison(
                item.label, "mean_kld", old["mean_kld"], kld, kld_limit, kld is not None and kld <= kld_limit
            ),
            BaselineComparison(
                item.label, "top1", old["top1"], top1, top1_limit, top1 is not None and top1 >= top1_limit
            ),
        ]
    return comparisons


def write_junit(target: Path, summary: QualitySummary, comparisons: list[BaselineComparison]) -> Path:
    """JUnit XML: one test case per gate and per baseline comparison, so CI systems show each."""
    suite = ET.Element("testsuite", name="edge-export check")
    count = failures = 0
    for item in summary.items:
        for gate in item.gates:
            case = ET.SubElement(suite, "testcase", classname=f"edge-export.{item.label}", name=gate.gate)
            count += 1
            if not gate.passed:
                failures += 1
                detail = item.metrics.get("error") or f"{gate.gate}: {gate.value} against limit {gate.limit}"
                diagnosis = gate_diagnosis(item.label, item.metrics)
                detail += f" {diagnosis}" if diagnosis else ""
                ET.SubElement(case, "failure", message=detail[:500]).text = detail
    for comparison in comparisons:
        name = f"baseline {comparison.metric}"
        case = ET.SubElement(suite, "testcase", classname=f"edge-export.{comparison.label}", name=name)
        count += 1
        if not comparison.passed:
            failures += 1
            message = (
                f"{comparison.metric} {comparison.current} against baseline {comparison.baseline} "
                f"(allowed {comparison.allowed:.6g})"
            )
            ET.SubElement(case, "failure", message=message)
    suite.set("tests", str(count))
    suite.set("failures", str(failures))
    root = ET.Element("testsuites")
    root.append(suite)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(target) as partial:
        tree.write(partial, encoding="utf-8", xml_declaration=True)
    return target
