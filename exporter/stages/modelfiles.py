"""modelfiles: an Ollama Modelfile per GGUF (or per base + runtime adapter), from the verified chat spec."""

from __future__ import annotations

from pathlib import Path

from exporter.core.version import __version__
from exporter.deploy.modelfile import ChatSpec, model_license, write_modelfile
from exporter.deploy.ollama_targets import TemplateChoice
from exporter.deploy.serve_config import ServeConfig, write_serve_config
from exporter.engine.run import Run


def write_modelfiles(
    run: Run,
    targets: dict[Path, tuple[Path, str]],
    spec: ChatSpec,
    license_dir: Path,
    adapter: Path | None = None,
    choice: TemplateChoice | None = None,
    projector: Path | None = None,
) -> list[Path]:
    """`targets`: Modelfile path -> (the GGUF it serves, a description for its header comment); `choice`
        (what the target Ollama renders chats with, and why) goes into the header comment too; `projector`, a
    vision-language model's mmproj GGUF, is every Modelfile's second FROM."""
    license_text = model_license(license_dir)
    written = []
    renders = (
        ""
        if choice is None
        else f"\nfor Ollama {choice.ollama_version}: renders with {choice.source}; {choice.reason}"
    )
    for target, (gguf, description) in targets.items():
        write_modelfile(
            run.guard.claim(target),
            gguf,
            spec,
            f"{description}, written by edge-export {__version__}{renders}",
            license_text,
            adapter=adapter,
            projector=projector,
        )
        written.append(target)
    return written


def write_serve_configs(run: Run, configs: dict[Path, ServeConfig]) -> list[Path]:
    """A llama-server launch config per target (see exporter.deploy.serve_config)."""
    return [write_serve_config(run.guard.claim(target), config) for target, config in configs.items()]
