"""The demo's real QLoRA adapter (demos/qlora.py: bitsandbytes NF4 on CPU, a few LoRA steps),
built once per recipe and cached outside the checkout (EDGE_EXPORT_TEST_CACHE)."""

from __future__ import annotations

from pathlib import Path

from demos.qlora import build_qlora_demo, recipe_key
from tests.sideenv import cache_dir


def qlora_fixture(base: Path) -> Path:
    """<cache>/qlora-<key>/{adapter, base-4bit}: the QLoRA adapter (its adapter_config.json names
    base-4bit) and the 4-bit base it was trained on."""
    return build_qlora_demo(base, cache_dir() / f"qlora-{recipe_key(base)}")
