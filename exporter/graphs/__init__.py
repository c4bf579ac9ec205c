"""The graphs of the exports: which stages an export runs and what each needs, wired by typed handles,
with what the export is before its run opens and the manifest made from its stages' records.

merge-quantize and runtime-lora each run one of these graphs; a batch runs many, side by side, as one."""
