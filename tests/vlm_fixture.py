"""The vision tests' inputs: demos/vlm.py's tiny vision-language models and adapters, built once per recipe
into the test cache (tests.sideenv.trained_run)."""

from __future__ import annotations

from pathlib import Path

from demos.vlm import build_family, recipe
from tests.sideenv import trained_run


def _built(family: str, demo_base: Path) -> tuple[Path, Path]:
    folder = trained_run(
        family, demo_base, recipe(family), lambda s, t: build_family(family, demo_base, s, t)
    )
    return folder / "base", folder / "adapter"


def smolvlm(demo_base: Path) -> tuple[Path, Path]:
    """The tiny SmolVLM and a LoRA trained with images on both towers and the connector."""
    return _built("smolvlm", demo_base)


def smolvlm_language_only(demo_base: Path) -> tuple[Path, Path]:
    """The tiny SmolVLM and a LoRA trained with images on its language model alone, as a runtime adapter
    can be (llama.cpp applies a runtime LoRA to the language model only)."""
    return _built("smolvlm-lm", demo_base)


def gemma3(demo_base: Path) -> tuple[Path, Path]:
    """The tiny Gemma-3 vision-language model and a LoRA trained with images on both towers."""
    return _built("gemma3-vlm", demo_base)
