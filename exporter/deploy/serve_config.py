"""llama-server as a deployment target: a launch command and a small config beside the GGUFs.

A merged GGUF is served with `--jinja`, so llama-server renders the model's own chat template (the one
checked in llama.cpp's Jinja engine at export). Runtime adapters are served as one quantized base with
every adapter loaded and none applied (`--lora a.gguf --lora b.gguf --lora-init-without-apply`); each
request names the scales of all adapters (`"lora": [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}]`),
since a request without that list runs with the server's global scales. This replaces the ADAPTER
Modelfiles that Ollama refuses from 0.34.1.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.core.atomic import atomic_target

SERVE_FORMAT = "edge-export/llama-server-1"
SERVE_SUFFIX = ".llama-server.json"
DEFAULT_PORT = 8080


@dataclass(frozen=True)
class ServedAdapter:
    """One runtime adapter of a served base: its id in llama-server is its position."""

    name: str
    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class ServeConfig:
    """How to run one GGUF (and its runtime adapters) in llama-server."""

    model: Path
    num_ctx: int | None
    adapters: tuple[ServedAdapter, ...] = ()
    llama_cpp_commit: str = ""
    notes: tuple[str, ...] = field(default=())
    mmproj: Path | None = None  # a vision-language model's projector (--mmproj)

    def command(self, folder: Path, port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> list[str]:
        """The launch command, with paths relative to `folder` (the command runs there)."""

        def rel(path: Path) -> str:
            return f"./{path.relative_to(folder).as_posix()}" if path.is_relative_to(folder) else str(path)

        command = ["llama-server", "-m", rel(self.model), "--jinja", "--host", host, "--port", str(port)]
        if self.mmproj is not None:
            command += ["--mmproj", rel(self.mmproj)]
        if self.num_ctx:
            command += ["-c", str(self.num_ctx)]
        for adapter in self.adapters:
            command += ["--lora", rel(adapter.path)]
        if self.adapters:
            command.append("--lora-init-without-apply")
        return command

    def request_lora(self, name: str) -> list[dict[str, Any]]:
        """The per-request `lora` field that runs adapter `name` alone, at its scale."""
        if name not in {a.name for a in self.adapters}:
            raise KeyError(f"no adapter {name!r}; served: {', '.join(a.name for a in self.adapters)}")
        return [{"id": i, "scale": a.scale if a.name == name else 0.0} for i, a in enumerate(self.adapters)]

    def to_json(self, folder: Path) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": SERVE_FORMAT,
            "llama_cpp_commit": self.llama_cpp_commit,
            "run_in": ".",
            "command": self.command(folder),
            "shell": shlex.join(self.command(folder)),
        }
        if self.adapters:
            data["adapters"] = [
                {"id": i, "name": a.name, "path": a.path.name, "scale": a.scale}
                for i, a in enumerate(self.adapters)
            ]
            data["requests"] = {
                a.name: {"lora": self.request_lora(a.name), "endpoint": "/v1/chat/completions"}
                for a in self.adapters
            }
        if self.notes:
            data["notes"] = list(self.notes)
        return data


def write_serve_config(target: Path, config: ServeConfig) -> Path:
    """Write the config (JSON) atomically; the launch command inside runs from the config's folder."""
    with atomic_target(target) as partial:
        partial.write_text(json.dumps(config.to_json(target.parent), indent=2) + "\n", encoding="utf-8")
    return target


def read_serve_config(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def adapter_refused_note(ollama_version: str) -> str:
    return (
        f"Ollama {ollama_version} refuses Modelfiles with ADAPTER, so none were written: serve the base with its "
        "adapters in llama-server (the .llama-server.json configs), or export each adapter merged with "
        "merge-quantize for Ollama"
    )
