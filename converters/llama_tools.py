"""llama.cpp built once per machine: the library llama-cpp-python loads, llama-server and render_chat_template.

Every native piece of edge-export comes from one CMake build of the full llama.cpp sources inside the
pinned llama-cpp-python sdist (the same commit as the vendored converter): libllama and ggml, which
llama-cpp-python's ctypes bindings load for quantizing and evaluating (the Makefile installs those
bindings without compiling anything, `CMAKE_ARGS=-DLLAMA_BUILD=OFF`, and this module copies the
built libraries into the package); llama-server, the runtime Ollama 0.30+ hands GGUF models to and a
deployment target of its own; and render_chat_template (vendor/llama_tools/render_chat_template.cpp),
which renders chat requests through llama.cpp's C++ Jinja engine exactly as llama-server's
/apply-template does. The build lands in a cache folder outside the checkout keyed by the commit and
the build flags, `~/.cache/edge-export/llama.cpp-<commit>/` (or $EDGE_EXPORT_LLAMA_TOOLS_DIR), so every
checkout on the machine reuses it. `python -m converters.llama_tools` (part of `make vendor`) builds
what is missing (4 to 10 minutes on 2 cores, its progress printed) and installs the libraries.

Standard library only, like vendor/fetch_llama_cpp.py: it runs right after the install.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PIN_FILE = PROJECT_ROOT / "vendor" / "llama_cpp.toml"
DOWNLOAD_DIR = PROJECT_ROOT / "vendor" / "downloads"
RENDERER_SOURCE = PROJECT_ROOT / "vendor" / "llama_tools" / "render_chat_template.cpp"
ENV_VAR = "EDGE_EXPORT_LLAMA_TOOLS_DIR"
# No network at build or run time (no curl, no OpenSSL, no prebuilt web UI); no tests or examples.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    # $ORIGIN run paths: the libraries work wherever they are copied (into llama-cpp-python's package).
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
)
# llama-server links libllama, ggml, mtmd and common, so its target builds every library that
# llama-cpp-python loads (llama, ggml*, mtmd) and the renderer links (common).
TARGETS = ("llama-server", "llama-common")
BINDINGS_STAMP = "edge-export-llama.cpp.json"
FIX = "run `make vendor` in the edge-export checkout (it builds llama.cpp once, 4 to 10 minutes on 2 cores)"


class LlamaToolsMissing(RuntimeError):
    """The tools are not built (or not for the pinned commit); the message says how to build them."""


@dataclass(frozen=True)
class LlamaTools:
    """The built programs and the llama.cpp commit they come from."""

    commit: str
    server: Path
    renderer: Path
    lib_dir: Path

    def env(self) -> dict[str, str]:
        """The environment the programs run in (their shared libraries beside them)."""
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = (
            f"{self.lib_dir}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else str(self.lib_dir)
        )
        return env


def _pin() -> dict[str, str]:
    with PIN_FILE.open("rb") as handle:
        return tomllib.load(handle)


def flags_key() -> str:
    return hashlib.sha256(" ".join(CMAKE_FLAGS).encode()).hexdigest()[:12]


def tools_root(commit: str) -> Path:
    override = os.environ.get(ENV_VAR)
    base = Path(override) if override else Path.home() / ".cache" / "edge-export"
    return base / f"llama.cpp-{commit[:12]}"


def _renderer_key() -> str:
    return hashlib.sha256(RENDERER_SOURCE.read_bytes()).hexdigest()[:12]


def _paths(commit: str) -> tuple[Path, Path, Path]:
    build = tools_root(commit) / f"build-{flags_key()}"
    return build, build / "bin" / "llama-server", build / "bin" / f"render_chat_template-{_renderer_key()}"


def locate_llama_tools() -> LlamaTools:
    """The built tools for the pinned commit; raises LlamaToolsMissing with the fix when they are not built."""
    commit = _pin()["llama_cpp_commit"]
    build, server, renderer = _paths(commit)
    for needed in (server, renderer):
        if not needed.is_file():
            raise LlamaToolsMissing(
                f"llama.cpp's {needed.name.split('-')[0] if 'render' in needed.name else needed.name} for the pinned "
                f"commit {commit[:9]} is not built ({needed} does not exist); {FIX}."
            )
    return LlamaTools(commit, server, renderer, build / "bin")


def _extract_sources(sdist: Path, target: Path) -> None:
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    staging = Path(tempfile.mkdtemp(prefix=".src-", dir=target.parent))
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            members = []
            for member in archive.getmembers():
                if member.name.startswith(prefix) and len(member.name) > len(prefix):
                    member.name = member.name[len(prefix) :]
                    members.append(member)
            archive.extractall(staging, members=members, filter="data")
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _run(command: list[str], log: Path, what: str = "llama.cpp's tools") -> None:
    """Run a build command, its output to the log; where the output counts a CMake build's progress
    ("[ 45%] …"), print how far it is every tenth of the way. A failure exits with the log's tail."""
    print(" ".join(command), flush=True)
    start = time.monotonic()
    shown = -1
    with log.open("a") as handle:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            handle.write(line)
            match = re.match(r"\[\s*(\d+)%\]", line)
            if match and int(match.group(1)) // 10 > shown:
                shown = int(match.group(1)) // 10
                minutes, seconds = divmod(int(time.monotonic() - start), 60)
                print(f"  {what}: {match.group(1)}% after {minutes}:{seconds:02d}", flush=True)
        returncode = process.wait()
    if returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        sys.exit(f"error: building {what} failed ({' '.join(command[:3])} …); the log is {log}:\n{tail}")


def _compile_renderer(source_dir: Path, build: Path, renderer: Path, log: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    partial = renderer.with_name(renderer.name + ".partial")
    includes = [f"-I{source_dir / sub}" for sub in ("common", "include", "ggml/include", "vendor")]
    libraries = ["-lllama-common", "-lllama-common-base", "-lllama", "-lggml", "-lggml-base"]
    available = [lib for lib in libraries if any((build / "bin").glob(f"lib{lib[2:]}.so*"))]
    _run(
        [compiler, "-std=c++17", "-O2", *includes, str(RENDERER_SOURCE), "-o", str(partial),
         f"-L{build / 'bin'}", *available, f"-Wl,-rpath,{build / 'bin'}", "-pthread"],
        log,
    )  # fmt: skip
    partial.rename(renderer)
    for stale in renderer.parent.glob("render_chat_template-*"):  # builds of earlier renderer sources
        if stale != renderer:
            stale.unlink()


def build_llama_tools(jobs: int | None = None) -> LlamaTools:
    """Build llama-server and render_chat_template for the pinned commit unless they are built already."""
    pin = _pin()
    commit = pin["llama_cpp_commit"]
    build, server, renderer = _paths(commit)
    root = tools_root(commit)
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"build-{flags_key()}.log"
    source_dir = root / "src"
    if not (source_dir / "CMakeLists.txt").is_file():
        sdist = DOWNLOAD_DIR / pin["sdist"]
        if not sdist.is_file():
            raise LlamaToolsMissing(f"{sdist} is missing; run `make vendor` first, which downloads it.")
        _extract_sources(sdist, source_dir)
    if not server.is_file():
        cores = jobs or os.cpu_count() or 2
        print(
            f"Building llama.cpp {commit[:9]} once for this machine with {cores} cores (4 to 10 minutes "
            f"with 2): the library llama-cpp-python loads, llama-server and the "
            f"chat-template renderer, into {build}; the full log is {log}",
            flush=True,
        )
        _run(["cmake", "-S", str(source_dir), "-B", str(build), *CMAKE_FLAGS], log)
        _run(
            ["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(cores)],
            log,
            f"llama.cpp {commit[:9]}",
        )
    if not renderer.is_file():
        _compile_renderer(source_dir, build, renderer, log)
    (root / "BUILT.json").write_text(
        json.dumps({"commit": commit, "flags": list(CMAKE_FLAGS)}, indent=2) + "\n"
    )
    return locate_llama_tools()


def bindings_lib_dir() -> Path | None:
    """The folder llama-cpp-python loads its shared libraries from (None when it is not installed);
    found without importing the package, which fails while the folder is empty."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "lib"


def _libraries(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.name.startswith("lib") and (".so" in p.name or p.suffix == ".dylib")
    )


def bindings_build() -> dict[str, str] | None:
    """The build whose libraries llama-cpp-python loads, as recorded when they were installed; None when
    they are llama-cpp-python's own (or absent)."""
    lib_dir = bindings_lib_dir()
    stamp = lib_dir / BINDINGS_STAMP if lib_dir else None
    if stamp is None or not stamp.is_file():
        return None
    recorded: dict[str, str] = json.loads(stamp.read_text())
    return recorded


def install_bindings_libraries(tools: LlamaTools) -> Path:
    """Copy the build's shared libraries into llama-cpp-python's package (replacing whatever is there),
    unless they are there already; the package then loads the same llama.cpp as llama-server."""
    lib_dir = bindings_lib_dir()
    if lib_dir is None:
        raise LlamaToolsMissing(
            "llama-cpp-python is not installed in this Python; run `make install` (or `make vendor`) in the "
            "edge-export checkout."
        )
    wanted = {"commit": tools.commit, "flags": flags_key()}
    if bindings_build() == wanted and any(lib_dir.glob("libllama.*")):
        return lib_dir
    staging = Path(tempfile.mkdtemp(prefix=".lib-", dir=lib_dir.parent))
    try:
        for library in _libraries(tools.lib_dir):
            shutil.copy2(library, staging / library.name, follow_symlinks=False)
        (staging / BINDINGS_STAMP).write_text(json.dumps(wanted, indent=2) + "\n")
        if lib_dir.exists():
            shutil.rmtree(lib_dir)
        staging.rename(lib_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return lib_dir


def main() -> None:
    try:
        tools = build_llama_tools()
        lib_dir = install_bindings_libraries(tools)
    except LlamaToolsMissing as exc:
        sys.exit(f"error: {exc}")
    print(f"llama.cpp {tools.commit[:9]}: {tools.server}, {tools.renderer}; llama-cpp-python loads {lib_dir}")


if __name__ == "__main__":
    main()
