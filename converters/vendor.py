"""Locate the vendored llama.cpp converter and check it matches the installed llama-cpp-python."""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from converters.errors import EnvironmentSetupError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PIN_FILE = PROJECT_ROOT / "vendor" / "llama_cpp.toml"
ENV_VAR = "EDGE_EXPORT_LLAMA_CPP_DIR"
FIX = "run `make vendor` in the edge-export checkout (or set EDGE_EXPORT_LLAMA_CPP_DIR to a folder it made)"


@dataclass(frozen=True)
class VendoredLlamaCpp:
    """The extracted converter folder and the revision it came from."""

    root: Path
    llama_cpp_python: str
    commit: str

    @property
    def convert_hf_script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def convert_lora_script(self) -> Path:
        return self.root / "convert_lora_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"


def vendor_dir() -> Path:
    override = os.environ.get(ENV_VAR)
    return Path(override) if override else PROJECT_ROOT / "vendor" / "llama.cpp"


def pinned() -> dict[str, str]:
    """The pin in vendor/llama_cpp.toml, when running from a checkout."""
    if not PIN_FILE.is_file():
        return {}
    with PIN_FILE.open("rb") as handle:
        return tomllib.load(handle)


def installed_llama_cpp_python() -> str | None:
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def locate_vendored() -> VendoredLlamaCpp:
    """The vendored converter, checked against the installed llama-cpp-python.

    Raises EnvironmentSetupError, with the fix, when the converter is missing, incomplete, or from
    a different llama.cpp revision than the quantizer and runtime.
    """
    root = vendor_dir()
    stamp = root / "REVISION.json"
    if not stamp.is_file():
        raise EnvironmentSetupError(
            f"The vendored llama.cpp converter is missing: {stamp} does not exist. "
            f"edge-export converts with llama.cpp's own convert_hf_to_gguf.py from the pinned revision; {FIX}."
        )
    recorded = json.loads(stamp.read_text())
    vendored = VendoredLlamaCpp(root, recorded["llama_cpp_python"], recorded["llama_cpp_commit"])
    for needed in (vendored.convert_hf_script, vendored.convert_lora_script, vendored.gguf_py / "gguf"):
        if not needed.exists():
            raise EnvironmentSetupError(
                f"The vendored llama.cpp in {root} is incomplete: {needed} is missing; {FIX}."
            )
    installed = installed_llama_cpp_python()
    if installed is None:
        raise EnvironmentSetupError(
            "llama-cpp-python is not installed, so nothing can quantize or evaluate GGUF files. "
            f"Install the pinned version: pip install llama-cpp-python=={vendored.llama_cpp_python}."
        )
    if installed != vendored.llama_cpp_python:
        pinned_version = pinned().get("llama_cpp_python")
        if installed == pinned_version:
            fix = f"the vendored converter is stale; {FIX}"
        else:
            wanted = pinned_version or vendored.llama_cpp_python
            fix = f"pip install llama-cpp-python=={wanted} (the version edge-export pins)"
        raise EnvironmentSetupError(
            f"The vendored converter in {root} comes from llama-cpp-python {vendored.llama_cpp_python} "
            f"(llama.cpp {vendored.commit[:9]}), but llama-cpp-python {installed} is installed; converter, "
            f"quantizer and runtime must share one llama.cpp revision. Fix: {fix}."
        )
    pin = pinned()
    if pin and pin.get("llama_cpp_commit") != vendored.commit:
        raise EnvironmentSetupError(
            f"vendor/llama_cpp.toml pins llama.cpp {pin.get('llama_cpp_commit', '?')[:9]} but {root} holds "
            f"{vendored.commit[:9]}; {FIX}."
        )
    return vendored
