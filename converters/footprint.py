"""The memory a GGUF needs to run at a context length, from its own header: the weights as stored and the
KV cache llama.cpp allocates for them.

llama.cpp (0c1e57098, src/llama-context.cpp, src/llama-kv-cache.cpp) pads the context to a multiple of 256
cells and keeps, per layer, K and V of n_head_kv × head_dim values per cell in float16 (the default cache
type): n_embd_k_gqa = key_length × head_count_kv, n_embd_v_gqa = value_length × head_count_kv, key_length
and value_length defaulting to embedding_length / head_count. Sliding-window layers (Gemma-2/3, gpt-oss, …)
keep fewer cells in llama.cpp; the figure counts them at the full context and says so (an upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from converters.gguf_header import read_gguf_header, read_gguf_metadata

CACHE_BYTES = 2  # float16 K and V, llama.cpp's default cache type
CONTEXT_PAD = 256
DEFAULT_CONTEXT_CAP = 8192


@dataclass(frozen=True)
class Footprint:
    """What running a GGUF at `context` tokens takes, weights and KV cache."""

    context: int  # the cells llama.cpp allocates (the asked context, padded to 256)
    trained_context: int | None
    weights_bytes: int
    kv_bytes: int | None  # None: the header does not give a plain per-layer KV (recurrent or per-layer heads)
    sliding_upper_bound: bool  # sliding-window layers counted at the full context

    @property
    def total_bytes(self) -> int | None:
        return None if self.kv_bytes is None else self.weights_bytes + self.kv_bytes


def default_context(trained: int | None) -> int:
    """The model's trained context, capped at 8k (a laptop's usual setting); 4096 when the GGUF has none."""
    return min(trained, DEFAULT_CONTEXT_CAP) if trained else 4096


def gguf_footprint(gguf: Path, context: int | None = None) -> Footprint:
    """The footprint of `gguf` at `context` tokens (default: its trained context, capped at 8k)."""
    arch = read_gguf_header(gguf).architecture
    names = {
        "layers": f"{arch}.block_count",
        "embd": f"{arch}.embedding_length",
        "heads": f"{arch}.attention.head_count",
        "kv_heads": f"{arch}.attention.head_count_kv",
        "key": f"{arch}.attention.key_length",
        "value": f"{arch}.attention.value_length",
        "trained": f"{arch}.context_length",
        "window": f"{arch}.attention.sliding_window",
    }
    values, _ = read_gguf_metadata(gguf, tuple(names.values()))
    get = {short: values.get(key) for short, key in names.items()}
    trained = int(get["trained"]) if get["trained"] else None
    asked = context or default_context(trained)
    cells = -(-asked // CONTEXT_PAD) * CONTEXT_PAD
    kv = None
    if get["layers"] and get["embd"] and get["heads"]:
        heads = int(get["heads"])
        kv_heads = int(get["kv_heads"] or heads)
        key = int(get["key"] or int(get["embd"]) // heads)
        value = int(get["value"] or int(get["embd"]) // heads)
        kv = int(get["layers"]) * cells * (key + value) * kv_heads * CACHE_BYTES
    return Footprint(cells, trained, gguf.stat().st_size, kv, bool(get["window"]))
