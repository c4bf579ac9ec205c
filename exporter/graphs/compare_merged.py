"""runtime-lora --compare-merged: each adapter also merged, converted and quantized beside the runtime
path (under <out>/merged/<adapter>/), by the same stages as merge-quantize, scored against the same
reference as its runtime pairs.

    merge:<A> ──▶ convert:<A> ──▶ quantize:<A>:<P> … ──▶ merged:<A>:<P> (needs reference:<A>)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporter.engine.graph import Results, Stage, StageGraph
from exporter.engine.run import Run
from exporter.inputs.options import QualityOptions
from exporter.inputs.records import BuiltGGUF, MergedModel, ModelInputs
from exporter.quality.reference import ArtifactQuality, Reference
from exporter.stages.gguf import convert_merged, quantize_from
from exporter.stages.merge import MERGED_DIR, merge_stage
from exporter.stages.quality import judged, score_stage
from quant_profiles import ProfileRegistry, QuantProfile

MergedScore = tuple[str, str, ArtifactQuality]  # (adapter, profile, its merged GGUF judged)


@dataclass(frozen=True)
class ComparisonNodes:
    """The handles of one adapter's merged branch: its GGUF per profile, and their scores."""

    quantized: dict[str, Stage[BuiltGGUF]]  # profile name -> its quantize node
    scored: list[Stage[MergedScore]]


class MergedComparison:
    """The merged branch of one adapter in a runtime-lora graph."""

    def __init__(
        self, run: Run, inputs: ModelInputs, folder: Path, registry: ProfileRegistry, quality: QualityOptions
    ):
        self.run, self.inputs, self.folder = run, inputs, folder
        self.registry, self.quality = registry, quality

    def add(
        self,
        graph: StageGraph,
        name: str,
        profiles: tuple[QuantProfile, ...],
        after: Stage[object],
        reference: Stage[Reference],
    ) -> ComparisonNodes:
        """Add the branch of adapter `name` (whose only adapter is in `inputs`) after node `after`, each
        GGUF scored against `reference`."""
        merge = graph.add(f"merge:{name}", lambda _: self.merge(name), (after,))
        convert = graph.add(f"convert:{name}", lambda r: self.convert(name, r[merge]), (merge,))
        quantized: dict[str, Stage[BuiltGGUF]] = {}
        scored = []
        for p in profiles:
            node = graph.add(
                f"quantize:{name}:{p.name}", self._quantize(name, p, convert), (convert,), shared=True
            )
            quantized[p.name] = node
            scored.append(
                graph.add(f"merged:{name}:{p.name}", self._score(name, p, reference, node), (reference, node))
            )
        return ComparisonNodes(quantized, scored)

    def merge(self, name: str) -> MergedModel:
        if not self.folder.parent.exists():  # <out>/merged, shared by every adapter's branch
            self.run.guard.claim(self.folder.parent)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.run.guard.claim(self.folder)
        return merge_stage(self.run, self.inputs, None, name, self.folder / MERGED_DIR, name=f"merge:{name}")

    def convert(self, name: str, merged: MergedModel) -> BuiltGGUF:
        ftype = merged.result.gguf_ftype
        target = self.folder / f"{name}-{ftype}.gguf"
        return convert_merged(
            self.run, f"convert:{name}", merged, name, target, self.registry.get(ftype), self.inputs.base_dir
        )

    def quantize(self, name: str, profile: QuantProfile, source: BuiltGGUF) -> BuiltGGUF:
        target = self.folder / f"{name}-{profile.name}.gguf"
        return quantize_from(self.run, f"quantize:{name}:{profile.name}", source, profile, target)

    def score(self, name: str, profile: QuantProfile, reference: Reference, built: BuiltGGUF) -> MergedScore:
        a = built.artifact
        node = f"merged:{name}:{profile.name}"
        metrics = score_stage(self.run, node, reference, a.path, a.sha256, self.quality)
        return (
            name,
            profile.name,
            judged(a.profile, a.path, a.size_bytes, a.bits_per_weight, metrics, profile, self.quality),
        )

    def _quantize(
        self, name: str, profile: QuantProfile, convert: Stage[BuiltGGUF]
    ) -> Callable[[Results], BuiltGGUF]:
        return lambda r: self.quantize(name, profile, r[convert])

    def _score(
        self, name: str, profile: QuantProfile, reference: Stage[Reference], built: Stage[BuiltGGUF]
    ) -> Callable[[Results], MergedScore]:
        return lambda r: self.score(name, profile, r[reference], r[built])
