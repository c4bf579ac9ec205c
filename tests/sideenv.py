"""Python environments with other transformers and PEFT releases, for tests of what those releases write.

The project's own environment has transformers 5.23 and PEFT 0.21.2. Inputs written by the releases
users still train with come from real installs of those releases, never from hand-written imitations:

- transformers 4.57.6: a venv of its own (torch 2.13.0 CPU, transformers and what PEFT needs);
- each PEFT release: installed without dependencies into a folder put first on PYTHONPATH, so one
  transformers environment serves every PEFT release.

Both are built once and cached outside the checkout (EDGE_EXPORT_TEST_CACHE, else
~/.cache/edge-export-tests), keyed by their recipe; a build happens in a temporary folder renamed into
place when complete, under a lock, so parallel test runs neither race nor see half an install.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

TORCH = "torch==2.13.0"  # the CPU build on this machine's disk; an unpinned torch pulls a CUDA build
TRANSFORMERS_ENVS = {
    "4.57.6": [TORCH, "transformers==4.57.6", "accelerate==1.15.0", "psutil", "pyyaml", "numpy==2.2.6"],
}
RECIPE_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("EDGE_EXPORT_TEST_CACHE", Path.home() / ".cache" / "edge-export-tests"))


@dataclass(frozen=True)
class SideEnv:
    """A Python interpreter and the folders to put first on its path."""

    transformers: str
    peft: str
    python: Path
    path: tuple[Path, ...]

    def env(self, extra: tuple[Path, ...] = ()) -> dict[str, str]:
        paths = [*self.path, *extra]
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in paths))
        environment.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        return environment

    def run(self, *args: str, extra_path: tuple[Path, ...] = (), timeout: float = 900) -> str:
        proc = subprocess.run(
            [str(self.python), *args],
            env=self.env(extra_path),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"{self} failed: {' '.join(args)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc.stdout

    def __str__(self) -> str:
        return f"transformers {self.transformers} + PEFT {self.peft}"


def _key(recipe: object) -> str:
    payload = json.dumps({"recipe": recipe, "python": sys.version_info[:2], "v": RECIPE_VERSION})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _build(target: Path, steps: list[list[str]]) -> Path:
    """Run `steps` (commands, with {dir} for the build folder) unless `target` exists."""
    with _locked(target):
        if target.is_dir():
            return target
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        for step in steps:
            command = [part.replace("{dir}", str(staging)) for part in step]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                raise RuntimeError(
                    f"building {target.name} failed: {' '.join(command)}\n{proc.stderr[-3000:]}"
                )
        staging.rename(target)
    return target


def trained_run(prefix: str, base: Path, spec: dict[str, Any], build: Callable[[Path, Path], None]) -> Path:
    """<cache>/<prefix>-<key>/: what `build(staging, target)` writes for `spec` on `base` (a model folder,
    keyed by its weights), built once under a lock into a staging folder renamed into place when complete;
    its recipe.json says it is."""
    weights = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    recipe = {**spec, "base": weights}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_dir() / f"{prefix}-{key}"
    with _locked(target):
        if not (target / "recipe.json").is_file():
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                build(staging, target)
                (staging / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def peft_folder(release: str) -> Path:
    """PEFT `release`, installed without dependencies into a folder of its own."""
    recipe = ["peft", release]
    target = cache_dir() / "peft" / f"peft-{release}-{_key(recipe)}"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", "{dir}"]
    return _build(target, [[*pip, f"peft=={release}"]])


def transformers_python(release: str) -> Path:
    """The interpreter of a venv with transformers `release` (the project's own for its own release)."""
    if release == version("transformers"):
        return Path(sys.executable)
    packages = TRANSFORMERS_ENVS[release]
    target = cache_dir() / "envs" / f"transformers-{release}-{_key(packages)}"
    venv_python = "{dir}/bin/python"
    _build(
        target,
        [
            [sys.executable, "-m", "venv", "{dir}"],
            [venv_python, "-m", "pip", "install", "--quiet", *packages],
        ],
    )
    return target / "bin" / "python"


def side_env(transformers: str, peft: str) -> SideEnv:
    """transformers `transformers` with PEFT `peft`, both real installs."""
    own = transformers == version("transformers") and peft == version("peft")
    path = () if own else (peft_folder(peft),)
    return SideEnv(transformers, peft, transformers_python(transformers), path)


# Trainers whose pins clash with ours (LLaMA-Factory 0.9.5: transformers<=5.6.0, peft<=0.18.1) or that need
# packages ours do not (torchtune 0.6.1 imports torchao, and torchao 0.16+ lacks what it imports).
# LLaMA-Factory's torchvision and torchaudio from PyPI are CUDA builds that cannot load beside the CPU torch:
# they are removed, and a stand-in torchaudio (only its audio inputs use it; its data module imports it
# unconditionally) goes on the path.
TRAINER_ENVS = {
    "torchtune": [[TORCH, "torchtune==0.6.1", "torchao==0.15.0"]],
    "llamafactory": [
        [TORCH, "torchvision==0.28.0", "llamafactory==0.9.5"],
        ["-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio"],
    ],
}
TORCHAUDIO_STANDIN = (
    "import pathlib, sys; p = pathlib.Path(sys.argv[1]) / 'standins' / 'torchaudio'; "
    "p.mkdir(parents=True); (p / '__init__.py').write_text("
    '\'__version__ = "0.0"\\n\\ndef load(*args, **kwargs):\\n'
    '    raise RuntimeError("torchaudio is not installed in this environment")\\n\')'
)


@dataclass(frozen=True)
class TrainerEnv:
    """A trainer's own venv: its interpreter, its scripts and what goes first on its path."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def env(self) -> dict[str, str]:
        standins = self.root / "standins"
        environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        environment.pop("PYTHONPATH", None)
        if standins.is_dir():
            environment["PYTHONPATH"] = str(standins)
        return environment


def trainer_env(name: str) -> TrainerEnv:
    steps = TRAINER_ENVS[name]
    target = cache_dir() / "envs" / f"{name}-{_key([steps, TORCHAUDIO_STANDIN])}"
    venv_python = "{dir}/bin/python"
    commands = [[sys.executable, "-m", "venv", "{dir}"]]
    for step in steps:
        commands.append(
            [venv_python, *step]
            if step[0] == "-m"
            else [venv_python, "-m", "pip", "install", "--quiet", *step]
        )
    if name == "llamafactory":
        commands.append([venv_python, "-c", TORCHAUDIO_STANDIN, "{dir}"])
    return TrainerEnv(_build(target, commands))
