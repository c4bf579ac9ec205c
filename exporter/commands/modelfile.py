"""`edge-export modelfile --gguf`: a verified Modelfile for any GGUF, from its embedded chat template."""

from __future__ import annotations

from pathlib import Path

from exporter.core.errors import InputError
from exporter.core.version import __version__
from exporter.deploy.modelfile import ChatSpec, chat_spec_from_gguf, write_modelfile


def modelfile_for_gguf(
    gguf: Path, out: Path | None = None, num_ctx: int | None = None
) -> tuple[Path, ChatSpec]:
    """Write the Modelfile (default: beside the GGUF, .Modelfile) and return it with its chat spec."""
    if not gguf.is_file():
        raise InputError(f"The GGUF {gguf} does not exist. Pass the path of a .gguf model file.")
    spec = chat_spec_from_gguf(gguf, num_ctx)
    target = out or gguf.with_suffix(".Modelfile")
    write_modelfile(target, gguf, spec, f"{gguf.stem}, written by edge-export {__version__}")
    return target, spec
