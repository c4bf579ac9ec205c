"""What a GGUF file says about itself, read in-process without the gguf package (see read_gguf_header).

converters.gguf_metadata, by contrast, rewrites a GGUF's metadata with the vendored gguf-py in a subprocess.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quant_profiles import LLAMA_FTYPES

FTYPE_NAMES = {number: name for name, number in LLAMA_FTYPES.items()}


@dataclass(frozen=True)
class GGUFHeader:
    """The header facts edge-export checks: architecture, file type, parameter count."""

    architecture: str
    file_type: int | None
    n_params: int
    n_tensors: int
    chat_template: str | None

    @property
    def file_type_name(self) -> str:
        if self.file_type is None:
            return "unknown"
        return FTYPE_NAMES.get(self.file_type, str(self.file_type))


# GGUF metadata value types: id -> struct format of a scalar (8 = string, 9 = array).
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_WANTED_KEYS = ("general.architecture", "general.file_type", "tokenizer.chat_template")


def read_gguf_header(path: Path) -> GGUFHeader:
    """Read a GGUF file's metadata and tensor table, skipping arrays (the vocabulary) and tensor data.

    A small reader of the documented format: the gguf package's reader parses every vocabulary
    string into numpy objects, which takes seconds per file and is not needed here.
    """
    values, tensors = read_gguf_metadata(path, _WANTED_KEYS)
    n_params = 0
    for dims in tensors.values():
        count = 1
        for dim in dims:
            count *= dim
        n_params += count
    return GGUFHeader(
        architecture=str(values.get("general.architecture")),
        file_type=values.get("general.file_type"),
        n_params=n_params,
        n_tensors=len(tensors),
        chat_template=values.get("tokenizer.chat_template"),
    )


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file as its header lists it: shape in ggml order (ne[0], the row length, first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int


def read_gguf_tensors(path: Path) -> list[TensorInfo]:
    """The tensors of a GGUF file, in file order, with their ggml types."""
    return _read_gguf(path, ())[1]


def read_gguf_metadata(
    path: Path, keys: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The scalar and string values of `keys` in a GGUF file, and its tensors' names and shapes."""
    values, tensors = _read_gguf(path, keys)
    return values, {t.name: t.shape for t in tensors}


def _read_gguf(path: Path, keys: tuple[str, ...]) -> tuple[dict[str, Any], list[TensorInfo]]:
    import mmap
    import struct

    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            offset = 8  # magic, version

            def unpack(fmt: str) -> Any:
                nonlocal offset
                try:
                    (value,) = struct.unpack_from(fmt, data, offset)
                except struct.error as exc:
                    raise ValueError(f"{path} is truncated") from exc
                offset += struct.calcsize(fmt)
                return value

            def string() -> str:
                nonlocal offset
                length = unpack("<Q")
                offset += length
                return data[offset - length : offset].decode("utf-8", errors="replace")

            def skip(value_type: int) -> None:
                nonlocal offset
                if value_type == 8:
                    length = unpack("<Q")  # read before `offset +=` loads offset
                    offset += length
                elif value_type == 9:
                    element_type, count = unpack("<I"), unpack("<Q")
                    if element_type in _SCALARS:
                        offset += struct.calcsize(_SCALARS[element_type]) * count
                    elif element_type == 8:  # the vocabulary: length-prefixed strings
                        for _ in range(count):
                            offset += 8 + struct.unpack_from("<Q", data, offset)[0]
                    else:
                        for _ in range(count):
                            skip(element_type)
                else:
                    offset += struct.calcsize(_SCALARS[value_type])

            n_tensors, n_kv = unpack("<Q"), unpack("<Q")
            values: dict[str, Any] = {}
            for _ in range(n_kv):
                key, value_type = string(), unpack("<I")
                if key in keys and value_type == 8:
                    values[key] = string()
                elif key in keys and value_type in _SCALARS:
                    values[key] = unpack(_SCALARS[value_type])
                else:
                    skip(value_type)
            tensors: list[TensorInfo] = []
            for _ in range(n_tensors):
                name = string()
                shape = tuple(unpack("<Q") for _ in range(unpack("<I")))
                tensors.append(TensorInfo(name, shape, unpack("<I")))
                offset += 8  # data offset
            if offset > len(data):
                raise ValueError(f"{path} is truncated")
    return values, tensors
