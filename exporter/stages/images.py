"""reference:images and the image half of quality:<P>: a vision-language export's check with images.

The unmerged model's answers on the image rows (exporter/quality/vision.py) are a stage of their own,
cached like the text reference; each GGUF pair (language model + mmproj) is scored on them in a libmtmd
child, cached by both files' hashes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from converters.metrics import TOP_K
from exporter.core.errors import StageError
from exporter.engine.run import Run
from exporter.engine.stage_keys import image_quality_key, image_reference_key
from exporter.inputs.base_config import read_base_config
from exporter.inputs.image_rows import load_image_rows
from exporter.inputs.options import QualityOptions
from exporter.inputs.records import ModelInputs
from exporter.quality.vision import (
    ImageReference,
    compute_image_reference,
    load_reference_model,
    prompt_image,
    score_images,
)

IMAGE_REFERENCE_FILE = "images.npz"


def image_reference_stage(
    run: Run, inputs: ModelInputs, options: QualityOptions, name: str = "reference:images"
) -> ImageReference | str:
    """The reference on the evaluation data's image rows (the built-in ones without --eval-data), or why
    there is none: no image rows, or a family whose llama.cpp prompt layout is not known here."""
    source, rows = load_image_rows(options.eval_data)
    if not rows:
        return f"{source} has no rows with an image"
    model_type = str(read_base_config(inputs.base_dir).get("model_type"))
    if prompt_image(model_type) is None:
        return (
            f"images not scored: how llama.cpp's prompt stands for an image of a {model_type} model is not known "
            "to this release (the text rows are scored as usual)"
        )
    key = image_reference_key(
        inputs.content(),
        [row.fingerprint() for row in rows],
        TOP_K,
        options.reference_dtype,
        options.max_new_tokens,
        run.versions,
    )

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report(f"computing the unmerged reference on {len(rows)} image rows of {source}")
        start = time.perf_counter()
        model = load_reference_model(inputs.base_dir, list(inputs.adapters), options)
        reference = compute_image_reference(
            model, inputs.base_dir, rows, options, staging / IMAGE_REFERENCE_FILE
        )
        meta.update(
            rows=reference.rows,
            prompt_tokens=reference.prompt_tokens,
            base_metrics=reference.base_metrics,
            source=source,
            seconds=round(time.perf_counter() - start, 3),
            what="unmerged model's answers on the image rows",
        )

    entry = run.stage(name, "reference-images", key, produce)
    meta = entry.meta
    # the images as found now (the key names them by content; a cached entry's paths may have moved)
    located = [{**cached, "image": str(row.image)} for cached, row in zip(meta["rows"], rows, strict=True)]
    return ImageReference(
        entry.path / IMAGE_REFERENCE_FILE, located, meta["prompt_tokens"], meta["base_metrics"], key
    )


def with_image_scores(
    run: Run,
    name: str,
    metrics: dict[str, Any],
    reference: ImageReference | str | None,
    gguf: Path,
    sha256: str,
    mmproj: tuple[Path, str],
    options: QualityOptions,
    lora: tuple[Path, str] | None = None,
) -> dict[str, Any]:
    """A GGUF's text `metrics` with its scores on the image rows added: the GGUF (with `lora`: and a runtime
    GGUF LoRA, each with its sha256) with the projector `mmproj` (path, sha256) against `reference`. The
    metrics as they are where there is no image reference (or why there is none) or the text evaluation
    failed."""
    if not isinstance(reference, ImageReference) or "error" in metrics:
        return metrics
    return {**metrics, **_image_scores(run, name, reference, gguf, sha256, mmproj, options, lora)}


def _image_scores(
    run: Run,
    name: str,
    reference: ImageReference,
    gguf: Path,
    sha256: str,
    mmproj: tuple[Path, str],
    options: QualityOptions,
    lora: tuple[Path, str] | None,
) -> dict[str, Any]:
    """The image metrics of one GGUF (and LoRA); {"image_error": …} where the evaluation fails (never cached)."""
    versions = run.versions["llama-cpp-python"]
    key = image_quality_key(sha256, mmproj[1], reference.key, versions, None if lora is None else lora[1])
    what = gguf.name + (f" + {lora[0].name}" if lora else "")

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report(f"evaluating {what} with {mmproj[0].name} on {len(reference.rows)} images")
        metrics = score_images(gguf, mmproj[0], reference, options, None if lora is None else lora[0])
        meta.update(metrics=metrics, what=f"image quality of {what}")

    try:
        entry = run.stage(f"{name}:images", "quality-images", key, produce)
    except StageError as exc:
        run.report(f"{name}: the evaluation with images failed: {exc}")
        return {"image_error": str(exc)}
    metrics: dict[str, Any] = entry.meta["metrics"]
    return metrics
