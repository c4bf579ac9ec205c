"""The reference's greedy answers, and the base's agreement with them.

The reference (base + adapter) answers each evaluation prompt greedily: a streamed model confirms drafts
(a 16-bit GGUF's answers from llama.cpp, checked teacher-forced: speculative decoding, the reference's own
tokens in one pass over its layers where the draft is right) or decodes all prompts in one batch; the
whole model decodes prompt by prompt. The base is never decoded: it is fed the reference's answers and
its top token compared at every step (converters.metrics.greedy_divergence), the same first divergence
as decoding it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from exporter.inputs.options import QualityOptions
from exporter.quality.streamed import batched_greedy, confirmed_greedy, stop_ids, window_log_probs

DECODED = "decoded by the reference"  # how the greedy answers were found, where no draft was confirmed


def reference_greedy(
    model: Any,
    streamed: bool,
    prompts: tuple[tuple[int, ...], ...],
    options: QualityOptions,
    drafts: list[list[int]] | None,
    stops: set[int],
) -> tuple[list[list[int]], str]:
    """The reference's greedy continuations, with the adapter, and how they were found: a streamed model
    confirms drafts (speculative decoding: its own tokens, one pass over its layers, then the answers a
    draft got wrong decoded on from there) or decodes all prompts in one batch (each step reads every layer
    once); the whole model decodes prompt by prompt. The base is not decoded: its greedy agreement is read
    teacher-forced on these continuations (converters.metrics.greedy_divergence)."""
    if streamed and prompts and drafts is not None:
        greedy, corrected = confirmed_greedy(
            model, prompts, drafts, options.max_new_tokens, stops, options.device
        )
        return greedy, (
            "drafted by llama.cpp from the 16-bit GGUF, confirmed by the reference teacher-forced in one pass; "
            f"{corrected} of {len(prompts)} decoded on by the reference from the draft's first wrong token"
        )
    if streamed and prompts:
        return batched_greedy(model, prompts, options.max_new_tokens, options.device), DECODED
    return [_greedy(model, prompt, options) for prompt in prompts], DECODED


def base_top_tokens(
    model: Any,
    streamed: bool,
    prompts: tuple[tuple[int, ...], ...],
    continuations: list[list[int]],
    device: str,
) -> Iterator[np.ndarray]:
    """The base's top token at every position of each prompt followed by the reference's continuation."""
    sequences = tuple((*p, *c) for p, c in zip(prompts, continuations, strict=True))
    if streamed:
        for _, base in window_log_probs(model, sequences, device, adapted=False):
            yield base.argmax(axis=-1)
        return
    import torch

    for sequence in sequences:
        with model.disable_adapter():
            logits = model(input_ids=torch.tensor([sequence], device=device)).logits[0]
        yield logits.argmax(dim=-1).cpu().numpy()


def _greedy(model: Any, prompt: tuple[int, ...], options: QualityOptions) -> list[int]:
    import torch

    ids = torch.tensor([prompt], device=options.device)
    stops = stop_ids(model)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=options.max_new_tokens,
        do_sample=False,
        pad_token_id=stops[0] if stops else None,
    )
    generated = out[0, len(prompt) :].tolist()
    cut = next((i for i, token in enumerate(generated) if token in stops), len(generated))
    return generated[:cut]
