"""runtime-lora --compare-merged: each adapter also merged, converted and quantized beside the runtime
path (under <out>/merged/<adapter>/), by the same stages as merge-quantize, scored against the same
reference as its runtime pairs.

    merge:<A> ──▶ convert:<A> ──▶ quantize:<A>:<P> … ──▶ merged:<A>:<P> (needs reference:<A>)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.graph import Results, StageGraph
from exporter.options import QualityOptions
from exporter.quality import ArtifactQuality
from exporter.records import BuiltGGUF, MergedModel, ModelInputs
from exporter.run import Run
from exporter.stages.gguf import convert_merged, quantize_from
from exporter.stages.merge import MERGED_DIR, merge_stage
from exporter.stages.quality import judged, score_stage
from quant_profiles import ProfileRegistry, QuantProfile


class MergedComparison:
    """The merged branch of one adapter in a runtime-lora graph."""

    def __init__(
        self, run: Run, inputs: ModelInputs, folder: Path, registry: ProfileRegistry, quality: QualityOptions
    ):
        self.run, self.inputs, self.folder, self.registry, self.quality = (
            run,
            inputs,
            folder,
            registry,
            quality,
        )

    def add(self, graph: StageGraph, name: str, profiles: tuple[QuantProfile, ...], after: str) -> list[str]:
        """Add the branch of adapter `name` (whose only adapter is in `inputs`) after node `after`; the
        names of its scoring nodes, each giving (adapter, profile, ArtifactQuality)."""
        graph.add(f"merge:{name}", lambda _: self.merge(name), (after,))
        graph.add(f"convert:{name}", lambda r: self.convert(name, r[f"merge:{name}"]), (f"merge:{name}",))
        scored = []
        for p in profiles:
            graph.add(f"quantize:{name}:{p.name}", self.quantizer(name, p), (f"convert:{name}",), shared=True)
            needs = (f"reference:{name}", f"quantize:{name}:{p.name}")
            scored.append(graph.add(f"merged:{name}:{p.name}", self.scorer(name, p), needs))
        return scored

    def merge(self, name: str) -> MergedModel:
        if not self.folder.parent.exists():  # <out>/merged, shared by every adapter's branch
            self.run.guard.claim(self.folder.parent)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.run.guard.claim(self.folder)
        return merge_stage(self.run, self.inputs, None, name, self.folder / MERGED_DIR, name=f"merge:{name}")

    def convert(self, name: str, merged: MergedModel) -> BuiltGGUF:
        ftype = merged.result.gguf_ftype
        target = self.folder / f"{name}-{ftype}.gguf"
        return convert_merged(self.run, f"convert:{name}", merged, name, target, self.registry.get(ftype))

    def quantizer(self, name: str, profile: QuantProfile) -> Any:
        def quantize(r: Results) -> BuiltGGUF:
            target = self.folder / f"{name}-{profile.name}.gguf"
            return quantize_from(
                self.run, f"quantize:{name}:{profile.name}", r[f"convert:{name}"], profile, target
            )

        return quantize

    def scorer(self, name: str, profile: QuantProfile) -> Any:
        def score(r: Results) -> tuple[str, str, ArtifactQuality]:
            a = r[f"quantize:{name}:{profile.name}"].artifact
            node = f"merged:{name}:{profile.name}"
            metrics = score_stage(self.run, node, r[f"reference:{name}"], a.path, a.sha256, self.quality)
            return (
                name,
                profile.name,
                judged(a.profile, a.path, a.size_bytes, a.bits_per_weight, metrics, profile, self.quality),
            )

        return score
