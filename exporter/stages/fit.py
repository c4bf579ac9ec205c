"""fit: the search of `merge-quantize --fit SIZE` run as stages, and the profile file it writes.

The evaluation windows are split in two: the search scores its trials on the even ones, and the report
gives every artifact's mean KLD on the odd ones too (held out: text the search never saw). Each trial is a
cache entry of its own, keyed by the type of every tensor, so a re-run with another budget (or more bands)
reuses every measurement it shares; the choice itself costs nothing (exporter.quality.fit.solve).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.fit_trial import run_trial
from converters.tensor_types import FileLayout, written_type
from exporter.core.atomic import write_text_atomic
from exporter.core.errors import InputError
from exporter.core.units import human_size
from exporter.engine.run import Run
from exporter.engine.stage_keys import fit_trial_key
from exporter.inputs.options import FitOptions, QualityOptions
from exporter.inputs.records import BuiltGGUF
from exporter.quality.fit import (
    BACKGROUND,
    LADDER,
    Choice,
    Reach,
    TensorGroup,
    assignment,
    candidate_tensors,
    choose_bands,
    file_type_for,
    reach,
    solve,
    tensor_assignment,
    tensor_groups,
    trial_count,
)
from exporter.quality.imatrix import ImatrixStage
from exporter.quality.reference import Reference
from quant_profiles import ProfileRegistry, QuantProfile, load_profile_file

PROFILE_SUFFIX = ".profile.toml"


def search_windows(reference: Reference) -> tuple[list[int], list[int]]:
    """(searched, held out): the even and the odd evaluation windows."""
    n = len(reference.eval.sequences)
    if n < 2:
        raise InputError(
            f"The evaluation data ({reference.eval.source}) makes {n} window of "
            f"{reference.eval.n_scored} tokens; --fit needs at least two, one to search on and one held out "
            "to judge the result. Pass more text with --eval-data (or a larger --eval-tokens)."
        )
    return list(range(0, n, 2)), list(range(1, n, 2))


def write_subset(reference: Reference, windows: list[int], target: Path) -> None:
    """The reference's log-probs of `windows` alone, written to `target` (npz)."""
    starts = np.cumsum([0] + [len(s) - 1 for s in reference.eval.sequences])
    with np.load(reference.file) as data:
        idx, lp = data["idx"], data["lp"]
        parts = [slice(int(starts[w]), int(starts[w + 1])) for w in windows]
        np.savez(
            target, idx=np.concatenate([idx[p] for p in parts]), lp=np.concatenate([lp[p] for p in parts])
        )


@dataclass(frozen=True)
class FitRecord:
    """What the search measured and chose, for the manifest and the report."""

    profile: QuantProfile
    profile_file: Path
    budget_bytes: int
    reach: Reach
    bands: int
    groups: list[dict[str, Any]]  # name, tensors, type, bytes, measured cost at that type
    trials: int
    trials_measured: int  # not found in the cache
    seconds: float  # this run's
    trial_seconds: float  # what the trials cost when measured (cached ones included): the search's cost
    base_kld: float  # the all-Q8_0 file's mean KLD on the searched windows
    predicted_kld: float
    predicted_bytes: int
    searched_windows: list[int]
    held_out_windows: list[int]

    def section(self) -> dict[str, Any]:
        data = asdict(self)
        data["profile"] = self.profile.name
        data["profile_file"] = self.profile_file.name
        return data


def fit_stage(
    run: Run,
    fit: FitOptions,
    f16: BuiltGGUF,
    reference: Reference,
    imatrix: ImatrixStage | None,
    registry: ProfileRegistry,
    quality: QualityOptions,
    profile_file: Path,
) -> FitRecord:
    """Search, choose, and write the fitted profile to `profile_file`."""
    start = time.perf_counter()
    layout = FileLayout.of(f16.path)
    n_params = f16.header.n_params
    budget = fit.budget_for(n_params)
    searched, held_out = search_windows(reference)
    with Trials(run, f16, layout, reference, imatrix, quality, searched) as trials:
        tensors = candidate_tensors(layout)
        base = trials.measure({t.name: BACKGROUND for t in tensors}, "every tensor at Q8_0", keep=True)
        tensors = [t for t in tensors if t.name in base["quantized"]]
        # the header the quantizer writes (its keys, an importance matrix's) is the one the sizes count
        layout = FileLayout(layout.tensors, base["overhead"])
        chosen = choose_bands(tensors, fit.max_trials)
        if chosen is None:
            needed = trial_count(tensor_groups(tensors, 1))
            raise InputError(
                f"--fit-trials {fit.max_trials} is too few: one band of layers already takes {needed} trials for "
                f"{f16.path.name}. Pass --fit-trials {needed} or more."
            )
        bands, groups = chosen
        reachable = reach(layout, groups)
        check_budget(fit, budget, reachable, f16.path)
        tokens = sum(len(s) - 1 for s in trials.sequences)
        run.report(
            f"fit search: {len(groups)} tensor groups ({bands} band{'s' if bands > 1 else ''} of layers) × the "
            f"types {', '.join(LADDER)}: {trial_count(groups)} trials, each a quantization of {f16.path.name} "
            f"and a score on {tokens} tokens (the even windows; the odd ones are held out): about "
            f"{base['seconds'] * trial_count(groups) / 60:.1f} min at the first trial's {base['seconds']:.1f} s, less "
            "what the cache holds; --fit-trials bounds it"
        )
        costs = trials.costs(groups, base["mean_kld"])
    choice = solve(layout, groups, costs, base["mean_kld"], budget)
    profile = fitted_profile(fit, groups, choice, registry, n_params, budget, bands, tokens)
    run.guard.claim(profile_file)
    write_text_atomic(profile_file, profile_toml(profile))
    if load_profile_file(profile_file) != profile:
        raise AssertionError(f"{profile_file} does not read back as the profile written")
    rows = [
        {
            "group": g.name,
            "tensors": len(g.tensors),
            "type": choice.types[g.name],
            "written": sorted({written_type(choice.types[g.name], t.shape[0]) for t in g.tensors}),
            "bytes": g.bytes(choice.types[g.name]),
            "cost": costs[g.name][choice.types[g.name]],
        }
        for g in groups
    ]
    run.seconds["fit"] = round(time.perf_counter() - start, 3)
    run.report(
        f"fit: {profile.name} predicted {human_size(choice.size_bytes)} (budget {human_size(budget)}), mean KLD "
        f"{choice.predicted_kld:.5f} on the searched windows by the sum of the measured costs"
    )
    return FitRecord(
        profile,
        profile_file,
        budget,
        reachable,
        bands,
        rows,
        trial_count(groups),
        trials.measured,
        round(time.perf_counter() - start, 3),
        round(trials.seconds, 1),
        base["mean_kld"],
        choice.predicted_kld,
        choice.size_bytes,
        searched,
        held_out,
    )


def check_budget(fit: FitOptions, budget: int, reachable: Reach, gguf: Path) -> None:
    if reachable.smallest <= budget < reachable.largest:
        return
    raise InputError(
        f"{fit.flag} ({human_size(budget)}) is out of reach for {gguf.name}: the mixes of "
        f"{', '.join(LADDER)} go from {human_size(reachable.smallest)} ({reachable.smallest} bytes) to "
        f"{human_size(reachable.largest)} ({reachable.largest} bytes, every tensor at F16). Pass a budget in "
        "that range, or --profile F16 for the unquantized file."
    )


class Trials:
    """The search's measurements, each cached as a stage entry of its own. `layout`: the 16-bit GGUF's;
    used as a context manager, it holds a scratch folder where the reference's log-probs on the searched
    windows are written, once, for the trials not in the cache."""

    def __init__(
        self,
        run: Run,
        f16: BuiltGGUF,
        layout: FileLayout,
        reference: Reference,
        imatrix: ImatrixStage | None,
        quality: QualityOptions,
        windows: list[int],
    ):
        self.run, self.f16, self.reference, self.imatrix, self.quality = run, f16, reference, imatrix, quality
        self.source_types = {t.name: t.ggml_type for t in layout.tensors}
        self.windows = windows
        self.sequences = [list(reference.eval.sequences[w]) for w in windows]
        self.measured = 0
        self.seconds = 0.0
        self._scratch = tempfile.TemporaryDirectory(prefix="edge-export-fit-")
        self._subset: Path | None = None  # written by the first trial measured

    def __enter__(self) -> Trials:
        return self

    def __exit__(self, *exc: object) -> None:
        self._scratch.cleanup()

    def subset(self) -> Path:
        if self._subset is None:
            self._subset = Path(self._scratch.name) / "reference.npz"
            write_subset(self.reference, self.windows, self._subset)
        return self._subset

    def measure(self, types: dict[str, str], what: str, keep: bool = False) -> dict[str, Any]:
        """The trial with `types` (tensor name -> requested type) for every tensor it names."""
        metadata = self.imatrix.gguf_metadata() if self.imatrix else None
        key = fit_trial_key(
            self.f16.key,
            self.reference.key,
            self.windows,
            types,
            self.imatrix.key if self.imatrix else None,
            self.run.versions["llama-cpp-python"],
            metadata,
        )

        def produce(staging: Path, meta: dict[str, Any]) -> None:
            patterns = {f"^{re.escape(name)}$": t for name, t in types.items()}
            result = run_trial(
                self.f16.path,
                staging,
                BACKGROUND,
                patterns,
                self.sequences,
                self.subset(),
                self.run.options.threads,
                self.imatrix.cached if self.imatrix else None,
                self.quality.gguf_device,
                keep=keep,
                metadata=metadata,
            )
            if keep:
                written = FileLayout.of(staging / "trial.gguf")
                result["quantized"] = [
                    t.name for t in written.tensors if t.ggml_type != self.source_types[t.name]
                ]
                result["overhead"] = written.overhead  # header and metadata as the fitted file will have them
                (staging / "trial.gguf").unlink()
            meta.update(result, what=f"fit trial: {what}")
            self.measured += 1

        entry, _ = self.run.cache.get_or_build("fit-trial", key, produce, label="fit")
        self.seconds += entry.meta["seconds"]
        return entry.meta

    def costs(self, groups: list[TensorGroup], base_kld: float) -> dict[str, dict[str, float]]:
        """Each group's measured cost at each rung of its ladder: the trial's mean KLD minus the base's."""
        todo = [(g, rung) for g in groups for rung in g.ladder if rung != BACKGROUND]
        costs: dict[str, dict[str, float]] = {g.name: {BACKGROUND: 0.0} for g in groups}
        started = time.perf_counter()
        for done, (group, rung) in enumerate(todo, start=1):
            before = self.measured
            types = tensor_assignment(groups, {group.name: rung})
            meta = self.measure(types, f"{group.name} at {rung}")
            costs[group.name][rung] = meta["mean_kld"] - base_kld
            if self.measured > before:
                left = (time.perf_counter() - started) / done * (len(todo) - done)
                self.run.report(
                    f"fit trial {done}/{len(todo)}: {group.name} at {rung}: mean KLD "
                    f"{costs[group.name][rung]:+.5f} ({meta['seconds']:.1f}s; about {left / 60:.1f} min left)"
                )
        return costs


def fitted_profile(
    fit: FitOptions,
    groups: list[TensorGroup],
    choice: Choice,
    registry: ProfileRegistry,
    n_params: int,
    budget: int,
    bands: int,
    tokens: int,
) -> QuantProfile:
    """The chosen mix as a profile: every group's pattern with its type; the gates of the built-in
    profile of the nearest size below it."""
    bpw = round(choice.size_bytes * 8 / n_params, 2) if n_params else 16.0
    builtin = sorted(
        (p for p in registry.profiles if not p.overrides.tensor_types and p.ftype not in ("F32", "BF16")),
        key=lambda p: p.bits_per_weight,
    )
    below = [p for p in builtin if p.bits_per_weight <= bpw] or builtin[:1]
    description = (
        f"Fitted by edge-export to {fit.text} ({budget} bytes): {len(groups)} tensor groups in {bands} band(s) of "
        f"layers, each type's cost measured against the unmerged model on {tokens} tokens; gates of "
        f"{below[-1].name}."
    )
    return QuantProfile(
        name=fit.label,
        ftype=file_type_for(groups, choice.types),
        description=description,
        bits_per_weight=bpw,
        overrides={"tensor_types": assignment(groups, choice.types)},  # type: ignore[arg-type]
        gates=below[-1].gates,
    )


def profile_toml(profile: QuantProfile) -> str:
    """A profile as the TOML of quant_profiles/ (strings quoted as JSON writes them, which TOML reads)."""
    lines = [
        f"name = {json.dumps(profile.name)}",
        f"ftype = {json.dumps(profile.ftype)}",
        f"bits_per_weight = {profile.bits_per_weight}",
        f"description = {json.dumps(profile.description)}",
        "",
        "[gates]",
        f"max_mean_kld = {profile.gates.max_mean_kld}",
        f"min_top1 = {profile.gates.min_top1}",
        "",
        "[overrides.tensor_types]",
        *(
            f"{json.dumps(pattern)} = {json.dumps(t)}"
            for pattern, t in profile.overrides.tensor_types.items()
        ),
    ]
    return "\n".join(lines) + "\n"
