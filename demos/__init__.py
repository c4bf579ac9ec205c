"""Builders of the demo's inputs (the SmolLM2 base as fp16 HF, a trained pirate adapter, its QLoRA
twin): used by `make demo`, the tests and the benches, not part of the installed package."""
