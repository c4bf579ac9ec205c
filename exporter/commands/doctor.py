"""`edge-export doctor`: one line per prerequisite, OK or FAIL with the fix."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from converters.llama_runtime import needs_extra_bufts_workaround
from converters.llama_tools import FIX, LlamaToolsMissing, bindings_build, locate_llama_tools
from converters.vendor import locate_vendored, pinned
from exporter.core.errors import ExportError
from exporter.engine.memory import mem_available

PACKAGES = ("torch", "transformers", "peft", "safetensors", "gguf", "typer", "rich", "pydantic")
MIN_FREE_DISK = 2 << 30
MIN_FREE_RAM = 2 << 30


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def run_checks(work_dir: Path) -> list[Check]:
    """Every prerequisite of an export, in the order doctor prints them."""
    checks = [
        Check("python", sys.version_info >= (3, 11), platform.python_version(), "use Python 3.11 or newer")
    ]
    for package in PACKAGES:
        try:
            checks.append(Check(package, True, version(package)))
        except PackageNotFoundError:
            checks.append(Check(package, False, "not installed", "pip install -e . (or make demo)"))
    checks += _llama_cpp_checks()
    try:
        vendored = locate_vendored()
        checks.append(
            Check("vendored converter", True, f"llama.cpp {vendored.commit[:9]} in {vendored.root}")
        )
    except ExportError as exc:
        checks.append(Check("vendored converter", False, str(exc), "make vendor"))
    try:
        tools = locate_llama_tools()
        checks.append(Check("llama-server", True, f"llama.cpp {tools.commit[:9]}: {tools.server}"))
    except LlamaToolsMissing as exc:
        checks.append(Check("llama-server", False, str(exc), "make vendor"))
    workaround = needs_extra_bufts_workaround()
    checks.append(
        Check(
            "CPU extra buffer types",
            True,
            ("AMX CPU: llama.cpp's extra buffer types crash here; " if workaround else "")
            + "GGUF evaluation runs with use_extra_bufts=False"
            + (
                " (EDGE_EXPORT_EXTRA_BUFTS=1 is set: on)"
                if os.environ.get("EDGE_EXPORT_EXTRA_BUFTS") == "1"
                else ""
            ),
        )
    )
    checks += _resource_checks(work_dir)
    return checks


def _llama_cpp_checks() -> list[Check]:
    """llama-cpp-python: loads, is the pinned version, and what it was built with."""
    checks = []
    pin = pinned()
    try:
        import llama_cpp

        system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        features = ", ".join(part.split("=")[0].strip() for part in system_info.split("|") if "= 1" in part)
        installed = version("llama-cpp-python")
        wanted = pin.get("llama_cpp_python", installed)
        checks.append(
            Check(
                "llama-cpp-python",
                installed == wanted,
                f"{installed} (CPU features: {features or 'none reported'})",
                f"pip install llama-cpp-python=={wanted}",
            )
        )
        metal = bool(llama_cpp.llama_supports_gpu_offload())
        checks.append(
            Check("llama.cpp GPU offload", True, "available" if metal else "not built in (CPU only)")
        )
    except Exception as exc:  # noqa: BLE001 - a broken build is exactly what doctor reports
        checks.append(
            Check(
                "llama-cpp-python",
                False,
                f"cannot load: {exc}",
                f"pip install --force-reinstall llama-cpp-python=={pin.get('llama_cpp_python', '0.3.36')}",
            )
        )
    built = bindings_build()
    wanted = pin.get("llama_cpp_commit", "")
    if built is None:
        checks.append(
            Check(
                "llama.cpp libraries",
                True,
                "llama-cpp-python's own build (`make vendor` installs the project's)",
            )
        )
    else:
        checks.append(
            Check(
                "llama.cpp libraries",
                built["commit"] == wanted,
                f"the project's build of llama.cpp {built['commit'][:9]} (the one llama-server comes from)",
                FIX,
            )
        )
    return checks


def _resource_checks(work_dir: Path) -> list[Check]:
    """Free disk where the export goes, available memory, and cores."""
    checks = []
    probe = work_dir if work_dir.exists() else Path.cwd()
    free_disk = shutil.disk_usage(probe).free
    checks.append(
        Check(
            "free disk",
            free_disk >= MIN_FREE_DISK,
            f"{free_disk / 2**30:.1f} GiB free in {probe}",
            "free some space: an export needs about 3x the base model's size",
        )
    )
    ram = mem_available()
    if ram is not None:
        checks.append(
            Check(
                "available RAM",
                ram >= MIN_FREE_RAM,
                f"{ram / 2**30:.1f} GiB",
                "close other programs; the merge needs about one shard plus one tensor",
            )
        )
    checks.append(Check("CPU cores", True, str(os.cpu_count())))
    return checks
