"""Convert a Hugging Face model folder to GGUF with the vendored convert_hf_to_gguf.py.

The script runs as a subprocess with the vendored gguf-py first on its path: the PyPI `gguf`
package of the same version number is different code and breaks the converter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from converters.child import die_with_parent, stderr_tail
from converters.errors import InputError, StageError
from converters.hashing import AppendHasher, sha256_file
from converters.vendor import VendoredLlamaCpp


def converter_env(vendored: VendoredLlamaCpp) -> dict[str, str]:
    """Environment for the vendored scripts: vendored gguf-py first, never the network."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(vendored.gguf_py), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def convert_hf_to_gguf(
    model_dir: Path,
    target: Path,
    vendored: VendoredLlamaCpp,
    model_name: str,
    outtype: str = "f16",
    metadata: dict[str, str] | None = None,
    pre_tokenizer_from: Path | None = None,
    vocab_only: bool = False,
    mmproj: bool = False,
) -> str:
    """Write `target` (a GGUF of `outtype`) from `model_dir`; `target` appears only when complete.

        `metadata` overrides general.* keys (the converter's --metadata), e.g. general.uuid.
        `pre_tokenizer_from`: a base folder whose tokenizer `model_dir`'s only extends with added tokens
        (converters.pretokenizer.grown_from): its hash names the pre-tokenizer where `model_dir`'s own is not
        in llama.cpp's table. `vocab_only` writes the vocabulary and metadata without tensors. `mmproj` writes a
    vision-language model's multimodal projector (its vision tower and projector, `--mmproj`) instead of its
    language model. Returns the
        sha256 of `target`, computed while the converter writes it.
    """
    partial = target.with_name(f".{target.name}.partial")
    metadata_file = target.with_name(f".{target.name}.metadata.json")
    launcher = [sys.executable]
    if pre_tokenizer_from is not None:
        launcher += ["-m", "converters.pretokenizer", str(pre_tokenizer_from)]
    command = [
        *launcher,
        str(vendored.convert_hf_script),
        str(model_dir),
        "--outtype",
        outtype,
        "--outfile",
        str(partial),
        "--model-name",
        model_name,
    ]
    if vocab_only:
        command.append("--vocab-only")
    if mmproj:
        command.append("--mmproj")
    if metadata:
        metadata_file.write_text(json.dumps(metadata))
        command += ["--metadata", str(metadata_file)]
    partial.unlink(missing_ok=True)  # the hasher must see only the file this converter creates
    hasher = AppendHasher(partial)
    try:
        try:
            proc = subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=converter_env(vendored),
                errors="replace",
                preexec_fn=die_with_parent,
            )
        finally:
            digest = hasher.digest()
        if proc.returncode != 0:
            raise _conversion_error(model_dir, vendored, proc.returncode, proc.stderr)
        if digest is None:
            digest = sha256_file(partial)
        os.replace(partial, target)
        return digest
    finally:
        partial.unlink(missing_ok=True)
        metadata_file.unlink(missing_ok=True)


def _conversion_error(model_dir: Path, vendored: VendoredLlamaCpp, code: int, stderr: str) -> Exception:
    revision = f"llama.cpp {vendored.commit[:9]} (llama-cpp-python {vendored.llama_cpp_python})"
    if "BPE pre-tokenizer was not recognized" in stderr:
        return InputError(
            f"llama.cpp's converter does not recognise the tokenizer in {model_dir} (its BPE "
            f"pre-tokenizer hash is not in the table of {revision}). The model cannot be converted "
            "faithfully with this revision; use a base whose tokenizer llama.cpp supports, or a newer "
            "edge-export release that pins a newer llama.cpp."
        )
    unsupported = re.search(r"Model (\S+) is not supported", stderr)
    if unsupported:
        return InputError(
            f"The architecture {unsupported.group(1)} of {model_dir / 'config.json'} is not supported by "
            f"{revision}, so it cannot be converted to GGUF. Use a supported architecture, or a newer "
            "edge-export release that pins a newer llama.cpp."
        )
    return StageError(
        f"convert_hf_to_gguf.py ({revision}) failed on {model_dir} with exit code {code}:\n{stderr_tail(stderr)}"
    )
