"""The merge-base section of a QLoRA export's report.json, report.md and manifest: both candidates, every
artifact against the model as trained and against the 16-bit reference, the losses and the choice."""

from __future__ import annotations

from typing import Any

CANDIDATE_TITLES = {"w16": "W16 + ΔW", "dequant": "dequant(Q4(W16)) + ΔW"}


def merge_base_section(
    decision: dict[str, Any],
    rows: list[dict[str, Any]],
    references: dict[str, dict[str, Any]],
    second_seconds: dict[str, float],
) -> dict[str, Any]:
    """decision: MergeBaseDecision.to_json(); rows: one per candidate and artifact (both KLDs, the loss)."""
    return {
        **decision,
        "references": references,
        "candidates": [{**row, "kept": row["candidate"] == decision["chosen"]} for row in rows],
        "second_candidate_seconds": second_seconds,
    }


def merge_base_markdown(section: dict[str, Any]) -> list[str]:
    trained = section["trained_on"]
    quantization = (
        f"{trained['quant_type'].upper()}{', double quant' if trained['double_quant'] else ''}, blocks of "
        f"{trained['block_size']}, compute {trained['compute_dtype']}; from {trained['source']}"
    )
    lines = ["## QLoRA: the merge base", ""]
    if not section["candidates"]:
        lines.append(f"The adapter was trained on a 4-bit base ({quantization}).")
    else:
        lines += [
            f"The adapter was trained on a 4-bit base ({quantization}). Each candidate below is compared with "
            "the model as trained (that 4-bit base + the adapter, unmerged) and with the 16-bit reference (the "
            "16-bit base + the adapter); eval loss is the GGUF's mean loss on the evaluation tokens (nats/token).",
            "",
            "| candidate | profile | KLD vs as trained | top-1 vs as trained | KLD vs 16-bit | eval loss | kept |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
    for row in section["candidates"]:
        lines.append(
            f"| {CANDIDATE_TITLES[row['candidate']]} | {row['profile']} | {row['kld_as_trained']:.5f} ± "
            f"{row['kld_as_trained_se']:.5f} | {row['top1_as_trained']:.1%} | {row['kld_16bit']:.5f} | "
            f"{row['eval_loss']:.4f} | {'yes' if row['kept'] else ''} |"
        )
    lines += [
        "",
        f"Kept: **{CANDIDATE_TITLES[section['chosen']]}** ({section['mode']}): {section['reason']}.",
        "",
    ]
    return lines
