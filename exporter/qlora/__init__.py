"""QLoRA adapters: bitsandbytes' round trip that rebuilds the 4-bit base an adapter was trained on
(exporter.inputs.trained_on says which), the unpacking of a 4-bit-only base, the merge-base decision,
and the report's section on it."""
