"""edge-export: merge a LoRA adapter, convert it to GGUF, quantize it and check it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-export")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
