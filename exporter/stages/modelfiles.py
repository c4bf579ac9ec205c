"""modelfiles: an Ollama Modelfile per GGUF (or per base + runtime adapter), from the verified chat spec."""

from __future__ import annotations

from pathlib import Path

from exporter import __version__
from exporter.modelfile import ChatSpec, model_license, write_modelfile
from exporter.run import Run


def write_modelfiles(
    run: Run,
    targets: dict[Path, tuple[Path, str]],
    spec: ChatSpec,
    license_dir: Path,
    adapter: Path | None = None,
) -> list[Path]:
    """`targets`: Modelfile path -> (the GGUF it serves, a description for its header comment)."""
    license_text = model_license(license_dir)
    written = []
    for target, (gguf, description) in targets.items():
        write_modelfile(
            run.guard.claim(target),
            gguf,
            spec,
            f"{description}, written by edge-export {__version__}",
            license_text,
            adapter=adapter,
        )
        written.append(target)
    return written
