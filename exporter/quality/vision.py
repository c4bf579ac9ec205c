"""The check with images: a vision-language export's GGUF pair (language model + mmproj) against the
unmerged model in transformers, with its own processor, on the evaluation rows that carry an image.

    image row ──processor──▶ unmerged model (base + adapters) ──▶ answer log-probs, greedy answer (cached)
             └─ prompt with llama.cpp's media marker ──▶ GGUF + mmproj in a libmtmd child ──▶ KLD, top-1, greedy

Only the answer's tokens are compared: the prompt's image positions are embeddings, which each side lays out
its own way around the same marker tokens. That the text tokens of the prompt are the same on both sides is
checked for every row (mtmd's tokenization against the processor's, image positions left out), so the answer
is scored after the same prompt. How llama.cpp's prompt stands for the image is known per family
(PROMPT_IMAGE); a family not in that table is exported and its text checked, and the report says its images
were not scored.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from converters.metrics import compare_rows, log_softmax, reference_rows, summarize
from converters.mtmd_runtime import score_image_rows
from exporter.core.errors import StageError
from exporter.inputs.adapter import LoraAdapter
from exporter.inputs.image_rows import ImageRow
from exporter.inputs.options import QualityOptions

# model_type -> (what the chat template writes for an image part, what llama.cpp's prompt holds instead;
# "{media}" is libmtmd's marker, around which mtmd writes the family's own image tokens).
PROMPT_IMAGE = {
    "idefics3": ("<image>", "{media}"),  # SmolVLM: <fake_token_around_image><row_…>… laid out by both sides
    "smolvlm": ("<image>", "{media}"),
    "gemma3": ("<start_of_image>", "\n\n{media}\n\n"),  # the processor wraps the image in blank lines
}


@dataclass(frozen=True)
class ImageReference:
    """The unmerged model on the image rows: compact answer log-probs (file), what the llama.cpp child
    needs per row, the prompts' text tokens, and the base's metrics (how far the adapter moved the answers)."""

    file: Path
    rows: list[dict[str, Any]]
    prompt_tokens: list[list[int]]
    base_metrics: dict[str, Any]
    key: str = ""  # its stage's key

    def section(self) -> dict[str, Any]:
        """report.json's "images": the rows scored with an image, and how llama.cpp was given them."""
        return {
            "rows": [{"image": Path(r["image"]).name, "answer_tokens": len(r["answer"])} for r in self.rows],
            "greedy_tokens": [len(r["greedy"]) for r in self.rows],
            "scored_with": "each GGUF with the mmproj GGUF through libmtmd (llama.cpp's multimodal path)",
        }


def with_image_floor(reference: Any, images: ImageReference | str | None) -> tuple[Any, dict[str, Any]]:
    """The text reference (exporter.quality.reference.Reference) with the base's distance on the image rows
    added to its base metrics (how far the adapter moves the answers about images), and report.json's
    "images" section: the rows, or why there are none."""
    if isinstance(images, ImageReference):
        base_metrics = {**reference.base_metrics, **images.base_metrics}
        return replace(reference, base_metrics=base_metrics), {"images": images.section()}
    return reference, ({} if images is None else {"images": {"note": images}})


def image_table(data: dict[str, Any]) -> list[str]:
    """report.md's section on the image rows: each GGUF pair against the unmerged model, and the base."""
    images = data.get("images")
    if not images:
        return []
    if "note" in images:
        return ["", "## With images", "", images["note"]]
    lines = [
        "",
        "## With images",
        "",
        f"Each GGUF with the projector, through libmtmd, on {len(images['rows'])} image rows "
        f"({', '.join(r['image'] for r in images['rows'])}): the answer's tokens after the same prompt and image.",
        "",
        "| profile | mean KLD | top-1 | greedy followed | answer tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in [*data["artifacts"], data["base_floor"]]:
        m = row["metrics"]
        if "image_error" in m:
            lines.append(f"| {row['label']} | evaluation failed: {m['image_error']} | | | |")
        elif "image_mean_kld" in m:
            greedy = "–" if m.get("image_greedy") is None else f"{m['image_greedy']:.0%}"
            lines.append(
                f"| {row['label']} | {m['image_mean_kld']:.3g} | {m['image_top1']:.1%} | {greedy} | {m['image_tokens']} |"
            )
    return lines


def runtime_image_lines(pairs: list[Any]) -> list[str]:
    """runtime-lora's report.md on the image rows: each quantized base + GGUF LoRA with the projector."""
    seen = [q for q in pairs if {"image_mean_kld", "image_error"} & set(q.runtime.metrics)]
    if not seen:
        return []
    lines = [
        "",
        "With images (each base + adapter with the mmproj, through libmtmd, on the answers' tokens):",
        "",
        "| adapter | profile | mean KLD | top-1 | greedy followed |",
        "|---|---|---:|---:|---:|",
    ]
    for q in seen:
        m = q.runtime.metrics
        if "image_error" in m:
            lines.append(f"| {q.adapter} | {q.profile} | evaluation failed: {m['image_error']} | | |")
            continue
        greedy = "–" if m.get("image_greedy") is None else f"{m['image_greedy']:.0%}"
        lines.append(
            f"| {q.adapter} | {q.profile} | {m['image_mean_kld']:.3g} | {m['image_top1']:.1%} | {greedy} |"
        )
    return lines


def prompt_image(model_type: str) -> tuple[str, str] | None:
    return PROMPT_IMAGE.get(model_type)


def compute_image_reference(
    model: Any, base_dir: Path, rows: tuple[ImageRow, ...], options: QualityOptions, target: Path
) -> ImageReference:
    """The reference on `rows` with `model` (PEFT's unmerged model of a vision-language base), written to
    `target` (npz: idx, lp, nll over every answer token)."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    from exporter.inputs.base_config import read_base_config

    config = read_base_config(base_dir)
    placeholder, stands_for = PROMPT_IMAGE[str(config.get("model_type"))]
    processor = AutoProcessor.from_pretrained(str(base_dir), local_files_only=True)
    tokenizer = processor.tokenizer
    # the token the processor repeats for the image's embeddings (Gemma3Processor's own image_token_id is
    # the token that opens an image)
    image_id = config.get("image_token_id", config.get("image_token_index"))
    parts: dict[str, list[np.ndarray]] = {"idx": [], "lp": [], "nll": []}
    base_parts: dict[str, list[np.ndarray]] = {"kld": [], "same_top": [], "nll": []}
    child_rows, prompt_tokens = [], []
    for row in rows:
        prompt = str(processor.apply_chat_template(row.prompt, add_generation_prompt=True))
        with Image.open(row.image) as opened:
            image = opened.convert("RGB")
        asked = processor(text=prompt, images=[image], return_tensors="pt")
        full = processor(text=prompt + row.answer, images=[image], return_tensors="pt")
        ids = full["input_ids"][0].tolist()
        n_prompt = asked["input_ids"].shape[1]
        if ids[:n_prompt] != asked["input_ids"][0].tolist() or len(ids) == n_prompt:
            raise StageError(
                f"The processor of {base_dir} tokenizes the prompt of {row.image.name} differently once its answer "
                "follows, so the answer's tokens cannot be told apart; end the prompt (the chat template's "
                "assistant header) with a token boundary."
            )
        with torch.no_grad():
            adapted = log_softmax(model(**full).logits[0, n_prompt - 1 :].float().cpu().numpy())
            with model.disable_adapter():
                base = log_softmax(model(**full).logits[0, n_prompt - 1 :].float().cpu().numpy())
            generated = model.generate(**asked, max_new_tokens=options.max_new_tokens, do_sample=False)
        answer = np.asarray(ids[n_prompt - 1 :])
        rows_ref = reference_rows(adapted, answer)
        for key, value in rows_ref.items():
            parts[key].append(value)
        for key, value in compare_rows(base, answer, rows_ref["idx"], rows_ref["lp"]).items():
            base_parts[key].append(value)
        greedy = generated[0, n_prompt:].tolist()
        bos = tokenizer.bos_token
        child_rows.append(
            {
                "image": str(row.image),
                "prompt": prompt.replace(placeholder, stands_for),
                "add_special": bool(
                    ids and ids[0] == tokenizer.bos_token_id and not (bos and prompt.startswith(bos))
                ),
                "answer": ids[n_prompt:],
                "greedy": greedy,
            }
        )
        prompt_tokens.append([t for t in ids[:n_prompt] if t != image_id])
    arrays = {key: np.concatenate(values) for key, values in parts.items()}
    np.savez(target, **arrays)
    floor = {key: np.concatenate(values) for key, values in base_parts.items()}
    base_metrics = _image_metrics(
        summarize(floor["kld"], floor["same_top"], floor["nll"], arrays["nll"]), len(rows)
    )
    return ImageReference(target, child_rows, prompt_tokens, base_metrics)


def score_images(
    gguf: Path, mmproj: Path, reference: ImageReference, options: QualityOptions, lora: Path | None = None
) -> dict[str, Any]:
    """The GGUF pair's image metrics against the reference (image_mean_kld, image_top1, image_greedy: the
    share of the reference's greedy answer its top-1 follows, image_tokens, image_rows), after checking that llama.cpp
    saw the same prompt text as the processor; with `lora`, a runtime GGUF LoRA on the language model."""
    with tempfile.TemporaryDirectory(prefix="edge-export-images-") as scratch:
        output = Path(scratch) / "scored.npz"
        response = score_image_rows(
            gguf, mmproj, reference.rows, reference.file, output, options.threads, lora
        )
        with np.load(output) as scored, np.load(reference.file) as ref:
            metrics = summarize(scored["kld"], scored["same_top"], scored["nll"], ref["nll"])
    for row, theirs, ours in zip(
        reference.rows, response["prompt_tokens"], reference.prompt_tokens, strict=True
    ):
        if theirs != ours:
            raise StageError(
                f"llama.cpp's multimodal prompt for {Path(row['image']).name} holds other text tokens than the "
                f"processor's ({len(theirs)} against {len(ours)}): the image's layout differs between libmtmd and "
                "transformers for this family, so the answers cannot be compared."
            )
    followed = [
        n / len(row["greedy"]) if row["greedy"] else 1.0
        for n, row in zip(response["greedy_followed"], reference.rows, strict=True)
    ]
    metrics["greedy"] = float(np.mean(followed))
    return _image_metrics(metrics, len(reference.rows))


def _image_metrics(metrics: dict[str, Any], n_rows: int) -> dict[str, Any]:
    return {
        "image_mean_kld": metrics["mean_kld"],
        "image_top1": metrics["top1"],
        "image_greedy": metrics.get("greedy"),
        "image_tokens": metrics["tokens"],
        "image_rows": n_rows,
    }


def load_reference_model(base_dir: Path, adapters: list[LoraAdapter], options: QualityOptions) -> Any:
    """PEFT's unmerged model of a vision-language base, whole, in the reference's dtype."""
    import torch

    from exporter.quality.reference import whole_base, with_adapters

    model = whole_base(base_dir, getattr(torch, options.reference_dtype), options.trust_remote_code)
    return with_adapters(model, adapters, streamed=False).to(options.device).eval()
