"""edge-export: merge a LoRA adapter, convert it to GGUF, quantize it and check it.

The public Python API is the commands and their options, the same ones the CLI calls:

    from exporter import ExportOptions, InputOptions, OutputOptions, merge_quantize

Its names are imported on first use, so `import exporter` (and any module of exporter.core) stays
light: no command, no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from exporter.core.version import __version__

if TYPE_CHECKING:
    from exporter.commands.merge_quantize import ExportResult, merge_quantize
    from exporter.commands.runtime_lora import RuntimeLoraResult, runtime_lora
    from exporter.core.errors import ExportError
    from exporter.inputs.options import (
        ExportOptions,
        InputOptions,
        OutputOptions,
        ProfileOptions,
        QloraOptions,
        QualityOptions,
        RunOptions,
        RuntimeLoraOptions,
    )

# Each public name and the module that defines it.
PUBLIC_NAMES = {
    "merge_quantize": "exporter.commands.merge_quantize",
    "ExportResult": "exporter.commands.merge_quantize",
    "runtime_lora": "exporter.commands.runtime_lora",
    "RuntimeLoraResult": "exporter.commands.runtime_lora",
    "ExportOptions": "exporter.inputs.options",
    "RuntimeLoraOptions": "exporter.inputs.options",
    "InputOptions": "exporter.inputs.options",
    "OutputOptions": "exporter.inputs.options",
    "ProfileOptions": "exporter.inputs.options",
    "RunOptions": "exporter.inputs.options",
    "QualityOptions": "exporter.inputs.options",
    "QloraOptions": "exporter.inputs.options",
    "ExportError": "exporter.core.errors",
}

__all__ = [  # __version__ and PUBLIC_NAMES, spelled out for linters and type checkers
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "InputOptions",
    "OutputOptions",
    "ProfileOptions",
    "QloraOptions",
    "QualityOptions",
    "RunOptions",
    "RuntimeLoraOptions",
    "RuntimeLoraResult",
    "__version__",
    "merge_quantize",
    "runtime_lora",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for."""
    module = PUBLIC_NAMES.get(name)
    if module is None:
        raise AttributeError(
            f"module 'exporter' has no attribute {name!r}; its public names: {', '.join(__all__)}"
        )
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
