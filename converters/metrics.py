"""Quality metrics as llama-perplexity's KL-divergence mode defines them, in numpy.

Per scored position (predicting token t = ids[p+1]) with reference log-probs lb and test
log-probs lq: KLD = Σ_j p_j (lb_j − lq_j); same top-1 = [argmax lq = argmax lb]; nll = −lq_t;
Δp = q_t − p_t. The reference is stored compactly as its top-K log-probs per position (as
llama.cpp's KLD base file stores logits compactly): the KLD is then taken over the top-K tokens
plus one bucket for the rest of the vocabulary, which is exact when the top-K hold all the mass and
otherwise a slight underestimate (a coarse-graining never increases a KL divergence).

This module is imported by the GGUF evaluation child too, so it depends on numpy only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

TOP_K = 64
TINY = 1e-12


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def reference_rows(logprobs: np.ndarray, ids: np.ndarray, k: int = TOP_K) -> dict[str, np.ndarray]:
    """Compact reference for positions 0..n-2 of one sequence: top-k indices and log-probs, and nll."""
    rows = logprobs[:-1]
    top = np.argpartition(-rows, kth=min(k, rows.shape[1] - 1), axis=1)[:, :k]
    top_lp = np.take_along_axis(rows, top, axis=1)
    order = np.argsort(-top_lp, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    top_lp = np.take_along_axis(top_lp, order, axis=1)
    nll = -rows[np.arange(len(rows)), ids[1:]]
    return {"idx": top.astype(np.int32), "lp": top_lp.astype(np.float32), "nll": nll.astype(np.float32)}


def compare_logits(
    logits: np.ndarray, ids: np.ndarray, idx: np.ndarray, lp: np.ndarray
) -> dict[str, np.ndarray]:
    """compare_rows on raw logits, without materialising the full log-softmax (the GGUF side's hot loop).

    Only the log-sum-exp of each row is needed over the whole vocabulary; the log-probs are then
    gathered at the reference's top-K and at the next token.
    """
    rows = logits[:-1]
    peak = rows.max(axis=1, keepdims=True)
    lse = peak.astype(np.float64) + np.log(np.exp(rows - peak).sum(axis=1, keepdims=True, dtype=np.float64))
    lq = np.take_along_axis(rows, idx, axis=1).astype(np.float64) - lse
    nll = lse[:, 0] - rows[np.arange(len(rows)), ids[1:]]
    return _kld_rows(lq, lp, rows.argmax(axis=1) == idx[:, 0], nll)


def compare_rows(
    test_logprobs: np.ndarray, ids: np.ndarray, idx: np.ndarray, lp: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-position KLD(reference ‖ test), same-top-1 and test nll for one sequence."""
    rows = test_logprobs[:-1]
    lq = np.take_along_axis(rows, idx, axis=1).astype(np.float64)
    nll = -rows[np.arange(len(rows)), ids[1:]]
    return _kld_rows(lq, lp, rows.argmax(axis=1) == idx[:, 0], nll)


def _kld_rows(lq: np.ndarray, lp: np.ndarray, same_top: np.ndarray, nll: np.ndarray) -> dict[str, np.ndarray]:
    """KLD over the reference's top-K plus one bucket for the rest of the vocabulary."""
    lp64 = lp.astype(np.float64)
    p_top = np.exp(lp64)
    p_rest = np.clip(1.0 - p_top.sum(axis=1), 0.0, 1.0)
    q_rest = np.clip(1.0 - np.exp(lq).sum(axis=1), TINY, 1.0)
    rest = np.where(p_rest > TINY, p_rest * (np.log(np.maximum(p_rest, TINY)) - np.log(q_rest)), 0.0)
    kld = np.maximum((p_top * (lp64 - lq)).sum(axis=1) + rest, 0.0)
    return {"kld": kld.astype(np.float32), "same_top": same_top, "nll": np.asarray(nll, dtype=np.float32)}


def summarize(
    kld: np.ndarray, same_top: np.ndarray, nll_test: np.ndarray, nll_ref: np.ndarray
) -> dict[str, Any]:
    """Aggregates over all scored positions (means with standard errors, as llama-perplexity prints)."""
    n = len(kld)
    diff = nll_test.astype(np.float64) - nll_ref.astype(np.float64)
    dp = np.exp(-nll_test.astype(np.float64)) - np.exp(-nll_ref.astype(np.float64))
    return {
        "tokens": int(n),
        "mean_kld": float(kld.mean()),
        "mean_kld_se": float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "median_kld": float(np.median(kld)),
        "p99_kld": float(np.percentile(kld, 99)),
        "max_kld": float(kld.max()),
        "top1": float(same_top.mean()),
        "ppl_ref": float(math.exp(nll_ref.astype(np.float64).mean())),
        "ppl": float(math.exp(nll_test.astype(np.float64).mean())),
        "ln_ppl_ratio": float(diff.mean()),
        "ln_ppl_ratio_se": float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "rms_dp": float(math.sqrt((dp**2).mean())),
    }


def greedy_divergence(
    top: np.ndarray, prompt_length: int, continuation: list[int], max_new_tokens: int, stops: set[int]
) -> int | None:
    """Where a model's greedy continuation of a prompt first leaves the reference's (None: never), read
    from the model's top tokens over the prompt followed by the reference's continuation (teacher-forced:
    `top[i]` is its top token after position i). Decoding the model and comparing gives the same answer:
    both agree up to the first position where its top token is not the reference's. A reference that
    stopped before `max_new_tokens` must be matched by a stop token (one of `stops`) there too."""
    for step, token in enumerate(continuation):
        if int(top[prompt_length - 1 + step]) != token:
            return step
    if len(continuation) < max_new_tokens and int(top[prompt_length - 1 + len(continuation)]) not in stops:
        return len(continuation)
    return None


def greedy_summary(first_divergence: list[int | None]) -> dict[str, Any]:
    """How many greedy continuations match the reference's exactly, and where each first diverges."""
    matched = sum(d is None for d in first_divergence)
    return {
        "greedy_match": matched / len(first_divergence) if first_divergence else None,
        "greedy_prompts": len(first_divergence),
        "first_divergence": first_divergence,
    }


def greedy_agreement(reference: list[list[int]], test: list[list[int]]) -> dict[str, Any]:
    """How many greedy continuations match exactly, and where each first diverges (None: never)."""
    first_divergence: list[int | None] = []
    for ref, ours in zip(reference, test, strict=True):
        diverged = next((i for i, (a, b) in enumerate(zip(ref, ours, strict=False)) if a != b), None)
        if diverged is None and len(ref) != len(ours):
            diverged = min(len(ref), len(ours))
        first_divergence.append(diverged)
    return greedy_summary(first_divergence)
