"""The merge base of a QLoRA adapter, chosen by loss.

Two merges are defensible:

    W16 + ΔW                  (Unsloth: keeps the base's full precision for llama.cpp's own quantization)
    dequant(NF4(W16)) + ΔW    (axolotl: the weights the adapter was trained against)

and no per-layer rule tells which is better for a given model, so the choice is measured: the
candidate with the lower loss on the evaluation data, by a paired comparison of the per-token
losses of both F16 GGUFs; W16 when the difference is within the error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from exporter.inputs.trained_on import TrainedOn

# How many standard errors the mean loss difference must exceed before the dequantized base wins.
TIE_STANDARD_ERRORS = 2.0


@dataclass(frozen=True)
class MergeBaseDecision:
    """Which merge base was kept, and the paired loss comparison (or the user's word) behind it."""

    chosen: str  # "w16" or "dequant"
    mode: str  # "auto", or "w16"/"dequant" when forced
    trained_on: TrainedOn
    loss: dict[str, float]  # candidate -> mean loss (nats/token) of its F16 GGUF; empty when forced
    difference: float | None = None  # mean(loss_dequant - loss_w16) per token
    difference_se: float | None = None
    tokens: int = 0
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["trained_on"] = {**self.trained_on.content(), "source": self.trained_on.source}
        record["tie_standard_errors"] = TIE_STANDARD_ERRORS
        return record


def compare_losses(nll_w16: np.ndarray, nll_dequant: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the per-token loss difference dequant − W16 (the same tokens)."""
    diff = nll_dequant.astype(np.float64) - nll_w16.astype(np.float64)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(diff.mean()), se


def decide_merge_base(
    nll_w16: np.ndarray, nll_dequant: np.ndarray, trained_on: TrainedOn
) -> MergeBaseDecision:
    """The candidate with the lower loss; W16 unless dequant is lower by more than TIE_STANDARD_ERRORS SE."""
    mean, se = compare_losses(nll_w16, nll_dequant)
    loss = {"w16": float(nll_w16.mean()), "dequant": float(nll_dequant.mean())}
    if mean < -TIE_STANDARD_ERRORS * se:
        chosen, why = "dequant", "lower loss than W16 beyond the error"
    elif mean > TIE_STANDARD_ERRORS * se:
        chosen, why = "w16", "lower loss than dequant beyond the error"
    else:
        chosen, why = "w16", f"a tie within {TIE_STANDARD_ERRORS:g} standard errors: W16 is kept"
    reason = f"dequant − W16 = {mean:+.4f} ± {se:.4f} nats/token over {len(nll_w16)} tokens: {why}"
    return MergeBaseDecision(chosen, "auto", trained_on, loss, mean, se, len(nll_w16), reason)
