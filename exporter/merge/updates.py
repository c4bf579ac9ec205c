"""What a merge does to one tensor: the update kinds, and the plan that maps output tensors to them, with
the record of where each adapter's tensors went (checked by exporter.merge.coverage as the merge writes).

Each update applies in float32 to a working copy of the base tensor, in the order the adapters were given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class LoraUpdate:
    """One adapter's low-rank update of one weight (optionally DoRA)."""

    lora_a: torch.Tensor  # r × in   (for embeddings: r × num_embeddings)
    lora_b: torch.Tensor  # out × r  (for embeddings: dim × r)
    scale: float  # adapter weight · PEFT scaling
    fan_in_fan_out: bool = False
    embedding: bool = False
    magnitude: torch.Tensor | None = None  # DoRA

    def delta(self) -> torch.Tensor:
        """ΔW in the orientation the weight is stored in."""
        product = self.lora_b.float() @ self.lora_a.float()
        if self.fan_in_fan_out or self.embedding:
            product = product.T
        return product * self.scale

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """W + ΔW; `weight` is a float32 working copy, updated in place when there is no DoRA."""
        if self.magnitude is None:  # one fused multiply-add: no ΔW-sized temporaries
            a, b = self.lora_a.float(), self.lora_b.float()
            if self.fan_in_fan_out or self.embedding:
                return weight.addmm_(a.T, b.T, alpha=self.scale)
            return weight.addmm_(b, a, alpha=self.scale)
        delta = self.delta()
        # DoRA: rescale each output row of W + ΔW to the learned magnitude (PEFT's get_weight_norm).
        combined = weight + delta
        rows = combined.T if self.fan_in_fan_out else combined
        factor = self.magnitude.float() / torch.linalg.norm(rows, dim=1)
        return combined * (factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1))


@dataclass(frozen=True)
class ExpertsLoraUpdate:
    """LoRA on a stack of experts stored as one 3-D tensor: W_e + s·B_e·A_e (transposed: + s·(B_e·A_e)ᵀ)."""

    lora_a: torch.Tensor  # experts × r × in
    lora_b: torch.Tensor  # experts × out × r
    scale: float
    transposed: bool  # stored (experts, in, out)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        delta = torch.bmm(self.lora_b.float(), self.lora_a.float())
        return weight.add_(delta.transpose(1, 2) if self.transposed else delta, alpha=self.scale)


@dataclass(frozen=True)
class KasaUpdate:
    """KaSA (PEFT 0.21 `kasa_config`): W → SVD_{k−r}(W) + s·B·diag(d)·A.

    PEFT truncates the frozen base weight when the adapter is created, dropping its r smallest singular
    components (k = min(out, in)), and trains the update with a learned diagonal between A and B
    (peft/tuners/lora/variants.py, KasaLinearVariant). The truncation is recomputed here from the base,
    in float32 as PEFT does.
    """

    lora_a: torch.Tensor  # r × in
    lora_b: torch.Tensor  # out × r
    diag: torch.Tensor  # r
    scale: float
    rank: int

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        keep = min(weight.shape) - self.rank
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        truncated = (u[:, :keep] * s[:keep]) @ vh[:keep]
        b = self.lora_b.float() * self.diag.float()
        return truncated.addmm_(b, self.lora_a.float(), alpha=self.scale)


@dataclass(frozen=True)
class AddUpdate:
    """A trained LoRA bias (lora_B.bias), added with the adapter's scaling."""

    vector: torch.Tensor
    scale: float

    def apply(self, bias: torch.Tensor) -> torch.Tensor:
        return bias + self.vector.float() * self.scale


@dataclass(frozen=True)
class ScaleUpdate:
    """IA3: an elementwise rescaling vector, broadcast over the stored weight (or a bias)."""

    vector: torch.Tensor  # (out, 1) or (1, in) in the weight's stored orientation; 1-D for a bias

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * self.vector.float()


@dataclass(frozen=True)
class Replacement:
    """A full tensor the adapter trained (modules_to_save, bias="all"/"lora_only"), or the layer PEFT saved
    beside a LoRA or trained rows on it (base_layer: a resized embedding the adapter was trained on)."""

    tensor: torch.Tensor
    base_layer: bool = False

    def apply(self, _: torch.Tensor) -> torch.Tensor:
        # A copy: later updates of the same tensor apply in place, and the tensor may serve twice (tied).
        return self.tensor.to(torch.float32, copy=True)


@dataclass(frozen=True)
class TokenRows:
    """trainable_token_indices: these rows of the layer take these values (PEFT's index_copy)."""

    indices: torch.Tensor  # int64, one per row
    rows: torch.Tensor  # len(indices) × dim

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy_(0, self.indices, self.rows.float())


Update = LoraUpdate | ExpertsLoraUpdate | KasaUpdate | AddUpdate | ScaleUpdate | Replacement | TokenRows


@dataclass
class AdapterCoverage:
    """Where one adapter's tensors went."""

    weights: str
    tensors: int  # tensors in the adapter file
    placed: dict[str, list[str]] = field(
        default_factory=dict
    )  # module or full tensor → base tensors it changes
    placed_tensors: int = 0  # adapter tensors that went into the merge
    skipped: dict[str, str] = field(default_factory=dict)  # adapter tensor → why it changes nothing

    def place(self, source: str, targets: list[str], tensors: int) -> None:
        self.placed.setdefault(source, []).extend(targets)
        self.placed_tensors += tensors

    def check_complete(self) -> None:
        """Every tensor in the file is either merged or skipped for a stated reason."""
        if self.placed_tensors + len(self.skipped) != self.tensors:
            raise RuntimeError(
                f"{self.weights}: {self.tensors} tensors, of which {self.placed_tensors} were merged and "
                f"{len(self.skipped)} skipped; the rest were lost. This is a bug in edge-export's merge."
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "tensors": self.tensors,
            "merged_tensors": self.placed_tensors,
            "skipped": self.skipped,
            "targets": sum(len(t) for t in self.placed.values()),
        }


@dataclass
class MergePlan:
    """What happens to each output tensor, decided and checked before anything is written."""

    updates: dict[str, list[Update]] = field(default_factory=dict)
    # Output tensors that do not exist in the base, as (name, base tensor they start from).
    extra_outputs: list[tuple[str, str]] = field(default_factory=list)
    config_changes: dict[str, Any] = field(default_factory=dict)
    # Output tensors whose shape differs from the base's (a resized vocabulary), and the new row count.
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    vocab_rows: int | None = None
    vocab_owner: Any = None  # the LoraAdapter that resized the vocabulary
    # Where each adapter's tensors went (the coverage ledger), one entry per adapter in order.
    coverage: list[AdapterCoverage] = field(default_factory=list)
    model_type: str | None = None  # the base's, for diagnosing names that match nothing

    def add(self, name: str, update: Update) -> None:
        self.updates.setdefault(name, []).append(update)
