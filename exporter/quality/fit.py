"""The fit search (`merge-quantize --fit SIZE`): tensor groups, the trials that measure them, the budgeted choice.

The quantizable tensors of the 16-bit GGUF are grouped by kind (attn_q, ffn_down, token_embd, …) and by band
of layers. Each trial is one llama.cpp quantization in which every group is Q8_0 except one, at one type of
the ladder, scored against the unmerged reference on the search half of the evaluation windows; its mean KLD
minus the all-Q8_0 file's is that group's cost at that type (measured, not guessed), and its bytes are exact
(converters.tensor_types). A multiple-choice knapsack over the groups then picks the types that minimise the
summed cost within the budget. Every pattern names whole tensor names, so no two overlap and the order of a
profile's overrides does not matter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters.gguf_header import TensorInfo
from converters.tensor_types import FileLayout, group_bytes, padded, tensor_bytes, type_name, written_type
from exporter.inputs.safetensors_header import base_shard_files, read_header

LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16")
BACKGROUND = "Q8_0"
MAX_BANDS = 8
RESOLUTION = 8192  # cells of the knapsack's byte axis
# The llama.cpp file type a fitted profile declares, after the type that holds most of its bytes (with
# every tensor named by an override, the file type only sets general.file_type).
FILE_TYPES = {
    "Q2_K": "Q2_K",
    "Q3_K": "Q3_K_M",
    "Q4_0": "Q4_0",
    "Q4_K": "Q4_K_M",
    "Q5_0": "Q5_K_M",
    "Q5_1": "Q5_K_M",
    "Q5_K": "Q5_K_M",
    "Q6_K": "Q6_K",
    "Q8_0": "Q8_0",
    "F16": "Q8_0",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorGroup:
    """Tensors of one kind in one band of layers (or one tensor outside the blocks), named by one pattern."""

    name: str
    pattern: str
    tensors: tuple[TensorInfo, ...]

    @property
    def ladder(self) -> tuple[str, ...]:
        """The ladder's types that write different bytes for this group (a type whose fallback is
        another rung's type is left out), Q8_0 always among them."""
        seen: dict[tuple[str, ...], str] = {}
        for requested in LADDER:
            written = tuple(written_type(requested, t.shape[0]) for t in self.tensors)
            if written not in seen or requested == BACKGROUND:
                seen[written] = requested
        return tuple(seen.values())

    def bytes(self, requested: str) -> int:
        return group_bytes(self.tensors, requested)


def candidate_tensors(layout: FileLayout) -> list[TensorInfo]:
    """The tensors llama.cpp may quantize: weights of two or more dimensions, norms excepted, stored in
    16 or 32 bits (the trial of the all-Q8_0 file tells which of them llama.cpp really quantized)."""
    return [
        t
        for t in layout.tensors
        if len(t.shape) >= 2
        and t.name.endswith("weight")
        and "_norm.weight" not in t.name
        and type_name(t.ggml_type) in ("F16", "BF16", "F32")
    ]


def band_edges(n_layers: int, bands: int) -> list[tuple[int, int]]:
    """`bands` contiguous ranges of layers, as equal as can be: [(first, last), …]."""
    bands = max(1, min(bands, n_layers))
    edges = np.linspace(0, n_layers, bands + 1).round().astype(int)
    return [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def tensor_groups(tensors: list[TensorInfo], bands: int) -> list[TensorGroup]:
    """The groups of `tensors`: each kind of block tensor in `bands` bands of layers, and each tensor
    outside the blocks on its own."""
    by_kind: dict[str, dict[int, TensorInfo]] = {}
    groups: list[TensorGroup] = []
    for t in tensors:
        match = _BLOCK.match(t.name)
        if match is None:
            groups.append(TensorGroup(t.name.removesuffix(".weight"), f"^{re.escape(t.name)}$", (t,)))
        else:
            by_kind.setdefault(match.group(2), {})[int(match.group(1))] = t
    n_layers = 1 + max((layer for layers in by_kind.values() for layer in layers), default=0)
    for kind, layers in by_kind.items():
        short = kind.removesuffix(".weight")
        for first, last in band_edges(n_layers, bands):
            members = tuple(layers[i] for i in range(first, last + 1) if i in layers)
            if not members:
                continue
            numbers = "|".join(str(i) for i in range(first, last + 1) if i in layers)
            name = f"{short} {first}" if first == last else f"{short} {first}-{last}"
            groups.append(TensorGroup(name, rf"^blk\.(?:{numbers})\.{re.escape(kind)}$", members))
    return groups


def n_layers_of(tensors: list[TensorInfo]) -> int:
    layers = [int(m.group(1)) for t in tensors if (m := _BLOCK.match(t.name))]
    return 1 + max(layers) if layers else 0


def trial_count(groups: list[TensorGroup]) -> int:
    """Trials a search over `groups` runs: the all-Q8_0 file, and each group at each other rung."""
    return 1 + sum(len(g.ladder) - 1 for g in groups)


def choose_bands(tensors: list[TensorInfo], max_trials: int) -> tuple[int, list[TensorGroup]] | None:
    """The most bands of layers (up to MAX_BANDS) whose search runs at most `max_trials` trials; None
    when even one band runs more."""
    best = None
    for bands in range(1, min(MAX_BANDS, max(1, n_layers_of(tensors))) + 1):
        groups = tensor_groups(tensors, bands)
        if trial_count(groups) > max_trials:
            break
        best = (bands, groups)
    return best


def assignment(groups: list[TensorGroup], types: dict[str, str]) -> dict[str, str]:
    """Pattern -> type for every group: its type in `types` (by group name), else Q8_0."""
    return {g.pattern: types.get(g.name, BACKGROUND) for g in groups}


def tensor_assignment(groups: list[TensorGroup], types: dict[str, str]) -> dict[str, str]:
    """Tensor name -> requested type, for converters.tensor_types.FileLayout.size_with."""
    return {t.name: types.get(g.name, BACKGROUND) for g in groups for t in g.tensors}


@dataclass(frozen=True)
class Reach:
    """The sizes a mix of the ladder can reach for one 16-bit GGUF: all groups at their cheapest rung,
    all at their dearest."""

    smallest: int
    largest: int


def reach(layout: FileLayout, groups: list[TensorGroup]) -> Reach:
    low = {g.name: min(g.ladder, key=g.bytes) for g in groups}
    high = {g.name: max(g.ladder, key=g.bytes) for g in groups}
    return Reach(
        layout.size_with(tensor_assignment(groups, low)), layout.size_with(tensor_assignment(groups, high))
    )


@dataclass
class Choice:
    """The knapsack's answer: a type per group, the summed measured cost and the predicted file size."""

    types: dict[str, str]
    predicted_kld: float
    size_bytes: int
    notes: list[str] = field(default_factory=list)


def solve(
    layout: FileLayout,
    groups: list[TensorGroup],
    costs: dict[str, dict[str, float]],
    base_kld: float,
    budget: int,
) -> Choice:
    """The types that minimise the summed measured cost (mean KLD over the all-Q8_0 file's, per group and
    type) with the file no larger than `budget` bytes. Sizes are rounded up to the knapsack's cells, so the
    answer always fits; the cheapest mix is returned when nothing finer does."""
    named = {t.name for g in groups for t in g.tensors}
    fixed = layout.overhead + sum(
        padded(tensor_bytes(t.shape, type_name(t.ggml_type))) for t in layout.tensors if t.name not in named
    )
    capacity = budget - fixed
    unit = max(1, capacity // RESOLUTION)
    cells = capacity // unit
    options = [[(r, -(-g.bytes(r) // unit), costs[g.name][r]) for r in g.ladder] for g in groups]
    best = np.full(cells + 1, np.inf)
    best[0] = 0.0
    picks: list[np.ndarray] = []
    for group_options in options:
        new = np.full(cells + 1, np.inf)
        pick = np.full(cells + 1, -1, dtype=np.int16)
        for index, (_, weight, cost) in enumerate(group_options):
            if weight > cells:
                continue
            shifted = np.full(cells + 1, np.inf)
            shifted[weight:] = best[: cells + 1 - weight] + cost
            better = shifted < new
            new[better], pick[better] = shifted[better], index
        best, picks = new, [*picks, pick]
    types: dict[str, str] = {}
    notes: list[str] = []
    if not np.isfinite(best).any():
        types = {g.name: min(g.ladder, key=g.bytes) for g in groups}
        notes.append("the budget leaves no room above the cheapest mix")
    else:
        cell = int(np.argmin(best))
        for group, group_options, pick in zip(
            reversed(groups), reversed(options), reversed(picks), strict=True
        ):
            rung, weight, _ = group_options[int(pick[cell])]
            types[group.name] = rung
            cell -= weight
    predicted = base_kld + sum(costs[g.name][types[g.name]] for g in groups)
    size = layout.size_with(tensor_assignment(groups, types))
    return Choice({g.name: types[g.name] for g in groups}, predicted, size, notes)


def file_type_for(groups: list[TensorGroup], types: dict[str, str]) -> str:
    """The file type a fitted profile declares: after the type of most of its bytes."""
    held: dict[str, int] = {}
    for g in groups:
        held[types[g.name]] = held.get(types[g.name], 0) + g.bytes(types[g.name])
    return FILE_TYPES[max(held, key=lambda t: held[t])]


def estimated_reach(base_dir: Path) -> tuple[Reach, int]:
    """The sizes a mix can reach, estimated from the base's safetensors headers before any work (the
    GGUF's metadata and an adapter's added tokens are not counted), and the base's weight count. The
    search checks the exact figures once the 16-bit GGUF exists."""
    smallest = largest = n_params = 0
    for file in base_shard_files(base_dir):
        for entry in read_header(file):
            shape = tuple(reversed(entry.shape))  # ggml order: the row length first
            count = math.prod(shape)
            n_params += count
            if len(shape) >= 2 and entry.name.endswith("weight") and "norm" not in entry.name:
                smallest += min(tensor_bytes(shape, written_type(r, shape[0])) for r in LADDER)
                largest += 2 * count
            else:
                smallest += 4 * count
                largest += 4 * count
    return Reach(smallest, largest), n_params
