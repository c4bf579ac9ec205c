"""Write a llama.cpp importance-matrix GGUF from activation statistics keyed by Hugging Face names.

write_imatrix_gguf runs this module as `python -m converters.imatrix_gguf REQUEST RESPONSE` with the
vendored gguf-py first on PYTHONPATH (see converters.hf_to_gguf.converter_env), so names are mapped
by the same table that convert_hf_to_gguf.py used for the F16 GGUF. Every mapped name is checked
against that GGUF: it must exist and its row width (ne0) must equal the number of collected columns.

The file has llama-imatrix's layout: general.type = "imatrix", imatrix.datasets,
imatrix.chunk_count, imatrix.chunk_size, and per weight `<name>.in_sum2` (F32, ne0 x 1) and
`<name>.counts` (F32, 1 x 1), so llama.cpp's own llama-quantize --imatrix can read it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from converters.child import die_with_parent, stderr_tail
from converters.errors import StageError
from converters.hf_to_gguf import converter_env
from converters.vendor import VendoredLlamaCpp


def write_imatrix_gguf(request: dict[str, Any], vendored: VendoredLlamaCpp) -> dict[str, Any]:
    """Map names and write the imatrix GGUF in a subprocess that runs the vendored gguf-py.

    `request` names the statistics (.npz keyed by HF weight names), their token counts, the F16 GGUF
    the names are checked against, the target file and the calibration facts; the response gives the
    entries written and the HF names skipped."""
    with tempfile.TemporaryDirectory(prefix="edge-export-imatrix-child-") as scratch:
        request_file, response_file = Path(scratch) / "request.json", Path(scratch) / "response.json"
        request_file.write_text(json.dumps(request))
        proc = subprocess.run(
            [sys.executable, "-m", "converters.imatrix_gguf", str(request_file), str(response_file)],
            capture_output=True,
            text=True,
            env=converter_env(vendored),
            errors="replace",
            preexec_fn=die_with_parent,
        )
        if proc.returncode != 0 or not response_file.is_file():
            raise StageError(
                f"Writing the importance matrix {request['target']} failed (exit code {proc.returncode}). "
                f"Stderr:\n{stderr_tail(proc.stderr)}"
            )
        response: dict[str, Any] = json.loads(response_file.read_text())
        return response


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _write(request: dict[str, Any]) -> dict[str, Any]:
    """The child's side: runs with the vendored gguf-py importable."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(request["f16_gguf"])
    arch_name = _field(reader, "general.architecture")
    block_count = int(_field(reader, f"{arch_name}.block_count") or 0)
    archs = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch_name not in archs:
        raise SystemExit(f"unknown architecture {arch_name!r} in {request['f16_gguf']}")
    name_map = gguf.get_tensor_name_map(archs[arch_name], block_count)
    widths = {tensor.name: int(tensor.shape[0]) for tensor in reader.tensors}

    stats = np.load(request["stats"])
    writer = gguf.GGUFWriter(None, arch_name)
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [request["dataset"]])
    writer.add_uint32("imatrix.chunk_count", int(request["chunks"]))
    writer.add_uint32("imatrix.chunk_size", int(request["chunk_size"]))
    entries, skipped = 0, []
    for hf_name in sorted(stats.files):
        values = stats[hf_name].astype(np.float32)
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None or widths.get(gguf_name) != values.shape[0]:
            skipped.append(hf_name)
            continue
        writer.add_tensor(f"{gguf_name}.in_sum2", values.reshape(1, -1))
        count = float(request["counts"][hf_name])
        writer.add_tensor(f"{gguf_name}.counts", np.array([[count]], dtype=np.float32))
        entries += 1
    target = Path(request["target"])
    partial = target.with_name(f".{target.name}.partial")
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return {"entries": entries, "skipped": skipped}


def main() -> None:
    request_file, response_file = Path(sys.argv[1]), Path(sys.argv[2])
    response = _write(json.loads(request_file.read_text()))
    response_file.write_text(json.dumps(response))


if __name__ == "__main__":
    main()
