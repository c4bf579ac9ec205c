"""Streaming safetensors reading and writing with a working set of one tensor.

The safetensors library reads through a memory map (every page touched stays resident while the
file is open) and writes whole dicts of tensors. A merge of a 70B model needs neither: tensors are
read one at a time with plain file reads, and written into shard files whose headers are computed
up front from the planned names, dtypes and shapes, so each tensor goes to disk as soon as it is
produced. The format is the documented one: an 8-byte little-endian header length, a JSON header
({name: {dtype, shape, data_offsets}}, "__metadata__"), then the tensor bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import Any, BinaryIO

import torch

from exporter.inputs.safetensors_header import (
    ELEMENT_SIZES,
    WRITE_QUEUE,
    TensorEntry,
    corrupt_safetensors,
    read_header,
)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
assert DTYPES.keys() == ELEMENT_SIZES.keys()
NAMES = {dtype: name for name, dtype in DTYPES.items()}
__all__ = ["DTYPES", "NAMES", "TensorEntry", "read_header"]  # the header side is re-exported


def read_tensor(handle: BufferedReader, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor with a plain file read (no memory map)."""
    buffer = bytearray(entry.nbytes)
    handle.seek(entry.start)
    if handle.readinto(buffer) != entry.nbytes:
        raise corrupt_safetensors(entry.file, f"tensor {entry.name} is cut short")
    if not buffer:
        return torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
    return torch.frombuffer(buffer, dtype=DTYPES[entry.dtype]).reshape(entry.shape)


def iter_tensors(entries: list[TensorEntry]) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """Tensors in the given order, keeping one file open at a time."""
    handle: BufferedReader | None = None
    current: Path | None = None
    try:
        for entry in entries:
            if entry.file != current:
                if handle:
                    handle.close()
                handle, current = entry.file.open("rb"), entry.file
            assert handle is not None
            yield entry, read_tensor(handle, entry)
    finally:
        if handle:
            handle.close()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class StreamingShardWriter:
    """Writes planned tensors, in plan order, into shards of bounded size as they are produced.

    The bytes go to disk on a thread of their own, so the next tensor is merged while the last is
    written; at most WRITE_QUEUE tensors wait, which bounds the memory this costs. That thread also
    hashes what it writes: `digests` holds each finished shard's sha256."""

    def __init__(self, folder: Path, plan: list[PlannedTensor], max_shard_bytes: int):
        self.folder = folder
        self.shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for tensor in plan:
            if self.shards[-1] and size + tensor.nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(tensor)
            size += tensor.nbytes
        self.total_bytes = sum(t.nbytes for t in plan)
        self.order = [t for shard in self.shards for t in shard]
        self.position = 0
        self.handle: BinaryIO | None = None
        self.shard_index = -1
        self.remaining_in_shard = 0
        self.digests: dict[str, str] = {}
        self._hashers: dict[str, Any] = {}
        self._queue: queue.Queue[tuple[str, BinaryIO, Any] | None] = queue.Queue(maxsize=WRITE_QUEUE)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            name, handle, data = item
            if data is None:  # a finished shard
                handle.close()
                self.digests[name] = self._hashers.pop(name).hexdigest()
            elif self._error is None:  # after a failure, only empty the queue
                try:
                    handle.write(data)
                    self._hashers.setdefault(name, hashlib.sha256()).update(data)
                except BaseException as exc:  # disk full, …: raised in the merging thread
                    self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _wait_for_writes(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def _stop_writing(self) -> None:
        self._error = self._error or RuntimeError("the merge stopped")  # the writer drops what is queued
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _shard_name(self, index: int) -> str:
        if len(self.shards) == 1:
            return "model.safetensors"
        return f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def _open_next_shard(self) -> None:
        if self.handle:  # closed by the writer, after its last bytes
            self._queue.put((self._shard_name(self.shard_index), self.handle, None))
        self.shard_index += 1
        tensors = self.shards[self.shard_index]
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in tensors:
            header[tensor.name] = {
                "dtype": NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned, as safetensors does
        self.handle = (self.folder / self._shard_name(self.shard_index)).open("wb")
        name = self._shard_name(self.shard_index)
        self._queue.put((name, self.handle, struct.pack("<Q", len(encoded)) + encoded))
        self.remaining_in_shard = len(tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        planned = self.order[self.position]
        if planned.name != name or planned.dtype != tensor.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(
                f"tensor {name} {tensor.dtype} {tuple(tensor.shape)} does not follow the plan {planned}"
            )
        self._raise_if_failed()
        if self.remaining_in_shard == 0:
            self._open_next_shard()
        assert self.handle is not None
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._queue.put((self._shard_name(self.shard_index), self.handle, data.data))
        self.remaining_in_shard -= 1
        self.position += 1

    def finish(self) -> int:
        """Close the last shard and write the index when there is more than one; returns the shard count."""
        if self.position != len(self.order):
            raise RuntimeError(f"only {self.position} of {len(self.order)} planned tensors were written")
        if self.handle:
            self._queue.put((self._shard_name(self.shard_index), self.handle, None))
        self._wait_for_writes()
        if self.handle:
            with (self.folder / self._shard_name(self.shard_index)).open("rb+") as written:
                os.fsync(written.fileno())
            self.handle = None
        if len(self.shards) > 1:
            weight_map = {t.name: self._shard_name(i) for i, shard in enumerate(self.shards) for t in shard}
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return len(self.shards)

    def abort(self) -> None:
        self._stop_writing()
        if self.handle:
            self.handle.close()
            self.handle = None
