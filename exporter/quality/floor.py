"""The 16-bit floor: the merged folder itself (its weights rounded to the output dtype) scored in PyTorch
against the unmerged reference, so an unquantized GGUF's distance splits into what rounding the merged
weights costs and what the conversion and llama.cpp's runtime add.

    merged/*.safetensors ─▶ transformers' model, one decoder layer at a time ─▶ log-probs ─▶ KLD vs reference

Read the way the reference reads its base (quality/streamed.py): layer by layer from the shards where the
model allows it, else the whole model, in the reference dtype (so the 16-bit values are exact).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from converters.metrics import compare_rows, log_softmax, summarize
from exporter.inputs.options import QualityOptions
from exporter.quality.reference import Reference, whole_base
from exporter.quality.streamed import (
    StreamedWeights,
    empty_base,
    stored_tensors,
    stream_layers,
    streams,
    unstreamable,
    window_log_probs,
)


class _Plain:
    """A model without an adapter, in the shape the streamed passes take (they are written for PEFT's)."""

    def __init__(self, model: Any):
        self.model = model

    def get_base_model(self) -> Any:
        return self.model

    def disable_adapter(self) -> AbstractContextManager[None]:
        return nullcontext()

    def __getattr__(self, name: str) -> Any:  # named_modules, get_submodule, …: the model's own
        return getattr(self.model, name)


def rounding_floor(merged_dir: Path, reference: Reference, options: QualityOptions) -> dict[str, Any]:
    """The merged folder's metrics against the reference (mean KLD, top-1, ΔPPL, as for a GGUF)."""
    import torch

    from exporter.inputs.dialects import quiet_transformers

    quiet_transformers()
    if options.threads:
        torch.set_num_threads(options.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[options.reference_dtype]
    sequences = reference.eval.sequences
    with np.load(reference.file) as data:
        idx, lp = data["idx"], data["lp"]
    parts: dict[str, list[np.ndarray]] = {"kld": [], "same_top": [], "nll": []}
    position = 0
    with torch.no_grad():
        for sequence, window in zip(sequences, _windows(merged_dir, sequences, dtype, options), strict=True):
            n = len(sequence) - 1
            rows = compare_rows(
                window, np.asarray(sequence), idx[position : position + n], lp[position : position + n]
            )
            for key, value in rows.items():
                parts[key].append(value)
            position += n
    arrays = {key: np.concatenate(values) for key, values in parts.items()}
    return summarize(arrays["kld"], arrays["same_top"], arrays["nll"], reference.nll)


def _windows(
    merged_dir: Path, sequences: tuple[tuple[int, ...], ...], dtype: Any, options: QualityOptions
) -> Any:
    """Each window's log-probabilities under the merged model."""
    import torch

    if streams(merged_dir, []):
        weights = StreamedWeights(stored_tensors(merged_dir), {}, dtype, options.device)
        model = empty_base(merged_dir, options.trust_remote_code)
        weights.tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        plain = _Plain(model)
        if unstreamable(plain, weights) is None:
            stream_layers(plain, weights)
            model.eval()
            for adapted, _ in window_log_probs(plain, sequences, options.device, base=False):
                yield adapted
            return
    model = whole_base(merged_dir, dtype, options.trust_remote_code).to(options.device).eval()
    for sequence in sequences:
        ids = torch.tensor([sequence], device=options.device)
        yield log_softmax(model(input_ids=ids).logits[0].float().cpu().numpy())
