"""What a ggml tensor type costs in bytes, and which type llama.cpp really writes for a requested one.

The pinned llama.cpp (0c1e57098, src/llama-quant.cpp, tensor_type_fallback) replaces a type whose block does
not divide a tensor's row length: Q2_K and Q3_K become Q4_0, Q4_K becomes Q5_0, Q5_K Q5_1, Q6_K Q8_0, and a
32-block type that still does not divide it becomes F16. The sizes are ggml's type traits (ggml/src/ggml.c:
values per block, bytes per block); tests/test_fit.py checks them against the vendored gguf-py's table.
Every tensor's data starts at a multiple of the file's alignment (32 by default), so a GGUF's size is its
header plus each tensor's bytes rounded up to 32, which is how converters.tensor_types predicts the size of a
file llama.cpp has not written yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from converters.gguf_header import TensorInfo, read_gguf_tensors
from quant_profiles import GGML_TYPES

# ggml type -> (values per block, bytes per block)
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "IQ4_NL": (32, 18),
    "IQ4_XS": (256, 136),
}
FALLBACK = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "IQ4_XS": "IQ4_NL",
}
ALIGNMENT = 32
TYPE_NAMES = {number: name for name, number in GGML_TYPES.items()}


def written_type(requested: str, row_length: int) -> str:
    """The type llama.cpp writes for a tensor of rows of `row_length` values when `requested` is asked."""
    block = BLOCKS[requested][0]
    if row_length % block == 0:
        return requested
    fallback = FALLBACK.get(requested, requested)
    return fallback if row_length % BLOCKS[fallback][0] == 0 else "F16"


def tensor_bytes(shape: tuple[int, ...], ggml_type: str) -> int:
    """Bytes of a tensor of `shape` (ggml order: row length first) stored as `ggml_type`."""
    block, size = BLOCKS[ggml_type]
    rows = 1
    for dim in shape[1:]:
        rows *= dim
    return shape[0] // block * size * rows


def padded(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class FileLayout:
    """A GGUF file's tensors and the bytes it holds besides their data (header, metadata, padding)."""

    tensors: tuple[TensorInfo, ...]
    overhead: int

    @classmethod
    def of(cls, path: Path) -> FileLayout:
        tensors = tuple(read_gguf_tensors(path))
        data = sum(padded(tensor_bytes(t.shape, type_name(t.ggml_type))) for t in tensors)
        return cls(tensors, path.stat().st_size - data)

    def size_with(self, types: dict[str, str]) -> int:
        """The file's size with the tensors named in `types` stored as the type llama.cpp writes for it
        (written_type) and the others as they are."""
        total = self.overhead
        for t in self.tensors:
            chosen = types.get(t.name)
            stored = type_name(t.ggml_type) if chosen is None else written_type(chosen, t.shape[0])
            total += padded(tensor_bytes(t.shape, stored))
        return total


def type_name(number: int) -> str:
    if number not in TYPE_NAMES:
        raise ValueError(f"ggml type {number} is not one edge-export can size")
    return TYPE_NAMES[number]


def group_bytes(tensors: Iterable[TensorInfo], requested: str) -> int:
    """The padded bytes of `tensors` when `requested` is asked for each of them."""
    return sum(padded(tensor_bytes(t.shape, written_type(requested, t.shape[0]))) for t in tensors)
