"""Copy a GGUF file with extra string metadata: `python -m converters.gguf_metadata IN OUT KEYS.json`.

Runs as a subprocess with the vendored gguf-py first on its path (see converters.lora_to_gguf),
using gguf-py's own copy routine from its gguf_new_metadata script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_string_metadata(source: Path, target: Path, values: dict[str, str]) -> None:
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(str(source), "r")
    architecture = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert architecture is not None, f"{source} has no general.architecture"
    writer = gguf.GGUFWriter(str(target), arch=architecture.contents(), endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    new = {key: MetadataDetails(gguf.GGUFValueType.STRING, value) for key, value in values.items()}
    copy_with_new_metadata(reader, writer, new, [])


if __name__ == "__main__":
    add_string_metadata(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text()))
