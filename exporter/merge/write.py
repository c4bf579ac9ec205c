"""Write the merged folder: every base tensor streamed through its planned updates into shards whose
headers are planned up front, with the config, tokenizer and provenance beside it, appearing only when
complete."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from exporter.core.errors import InputError
from exporter.inputs.adapter import LICENSE_PATTERN, LoraAdapter, tokenizer_source
from exporter.inputs.artifacts import MergeResult
from exporter.inputs.base_config import read_base_config
from exporter.inputs.dialects import (
    CHAT_TEMPLATE_FILES,
    portable_config,
    portable_tokenizer_config,
    read_chat_template,
)
from exporter.inputs.safetensors_header import (
    DEFAULT_SHARD_BYTES,
    DTYPE_ALIASES,
    DtypeChoice,
    choose_merge_dtype,
    master_reason,
)
from exporter.inputs.safetensors_io import DTYPES as SAFETENSORS_DTYPES
from exporter.inputs.safetensors_io import PlannedTensor, StreamingShardWriter, iter_tensors
from exporter.merge.coverage import CoverageCheck
from exporter.merge.plan import BaseModel, plan_merge
from exporter.merge.updates import MergePlan
from exporter.merge.vocab import EMBEDDING_NAMES, check_tokenizer_fits, special_token_changes

log = logging.getLogger(__name__)

DTYPES = {alias: SAFETENSORS_DTYPES[name] for alias, name in DTYPE_ALIASES.items()}
# Files copied from the base (or the adapter, for tokenizer files) into the merged folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# The image processor of a vision-language model: the projector's converter and the check read it.
PASSTHROUGH_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json")
PROVENANCE_FILE = "edge-export-merge.json"


def merge_adapters(
    base_dir: Path,
    adapters: list[LoraAdapter],
    out_dir: Path,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
    provenance: dict[str, Any] | None = None,
) -> MergeResult:
    """Merge `adapters` into the base at `base_dir` and write a complete HF folder at `out_dir`.

    Without `dtype`, a bfloat16 base is written as float16 when it fits float16's range
    (choose_merge_dtype); should the merged values then overflow, the merge is redone in bfloat16.
    """
    base_config = read_base_config(base_dir)
    base = BaseModel(base_dir)
    plan, untied = plan_merge(base, adapters, base_config)
    tokenizer_dir = tokenizer_source(adapters, base_dir)
    rows = plan.vocab_rows or next((base.shapes[n][0] for n in EMBEDDING_NAMES if n in base.shapes), None)
    if rows is not None:
        check_tokenizer_fits(plan, tokenizer_dir, base_dir, rows)
    plan.config_changes.update(special_token_changes(tokenizer_dir, base_dir, base_config))
    choice = choose_merge_dtype(base_dir, dtype)
    if not dtype and base.float_dtypes() == {"F32"}:
        log.warning("%s is stored in float32; writing the merged model as float16", base_dir)
    try:
        return _write_merge(
            base, adapters, plan, untied, base_config, choice, out_dir, max_shard_bytes, progress, provenance
        )
    except _Float16Overflow as overflow:
        if dtype or "BF16" not in base.float_dtypes():
            raise
        choice = DtypeChoice(
            "float32", master_reason(f"the merged {overflow.tensor} exceeds float16's range")
        )
        return _write_merge(
            base, adapters, plan, untied, base_config, choice, out_dir, max_shard_bytes, progress, provenance
        )


def _write_merge(
    base: BaseModel,
    adapters: list[LoraAdapter],
    plan: MergePlan,
    untied: bool,
    base_config: dict[str, Any],
    choice: DtypeChoice,
    out_dir: Path,
    max_shard_bytes: int,
    progress: Callable[[int, int], None] | None,
    provenance: dict[str, Any] | None,
) -> MergeResult:
    base_dir = base.base_dir
    out_dtype = DTYPES[choice.dtype]

    extra_after = {source: name for name, source in plan.extra_outputs}
    layout: list[PlannedTensor] = []
    for entry in base.entries:
        tensor_dtype = out_dtype if entry.dtype in ("F16", "BF16", "F32") else SAFETENSORS_DTYPES[entry.dtype]
        layout.append(PlannedTensor(entry.name, tensor_dtype, plan.shapes.get(entry.name, entry.shape)))
        if entry.name in extra_after:
            extra = extra_after[entry.name]
            layout.append(PlannedTensor(extra, tensor_dtype, plan.shapes.get(extra, entry.shape)))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary model folder
    writer = StreamingShardWriter(staging, layout, max_shard_bytes)
    watch = _RangeWatch(base_dir, adapters, out_dtype)
    coverage = CoverageCheck(plan.updates, plan.coverage)
    try:
        for done, (entry, tensor) in enumerate(iter_tensors(base.entries), start=1):
            _write_merged(writer, entry.name, tensor, plan, out_dtype, watch, coverage)
            if entry.name in extra_after:
                _write_merged(writer, extra_after[entry.name], tensor, plan, out_dtype, watch, coverage)
            if progress:
                progress(done, len(base.entries))
        ledger = coverage.ledger()
        shard_count = writer.finish()
        _write_side_files(
            base_dir,
            tokenizer_source(adapters, base_dir),
            staging,
            base_config,
            out_dtype,
            plan.config_changes,
        )
        merged_names = set(plan.updates) | {name for name, _ in plan.extra_outputs}
        if provenance is not None:
            record = {
                **provenance,
                "dtype": choice.dtype,
                "dtype_reason": choice.why,
                "shards": shard_count,
                "merged_tensors": sorted(merged_names),
                "coverage": ledger,
                "config_changes": plan.config_changes,
                "max_abs": watch.max_abs,
            }
            (staging / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        writer.abort()
        if staging.exists():
            shutil.rmtree(staging)
    return MergeResult(
        out_dir,
        len(merged_names),
        len(layout),
        choice.dtype,
        shard_count,
        untied,
        dict(writer.digests),
        watch.max_abs,
        choice.why,
        ledger,
    )


class _Float16Overflow(InputError):
    """A value beyond float16's range met a float16 output."""

    def __init__(self, message: str, tensor: str):
        super().__init__(message)
        self.tensor = tensor


class _RangeWatch:
    """Finite values only, whatever the dtypes: the largest |value| written (bfloat16/float32 outputs,
    which may not fit float16 later), and no tensor cast from bfloat16/float32 to float16 may overflow."""

    def __init__(self, base_dir: Path, adapters: list[LoraAdapter], out_dtype: torch.dtype):
        self.base_dir = base_dir
        self.adapter_files = ", ".join(str(a.weights) for a in adapters)
        self.out_dtype = out_dtype
        self.max_abs: float | None = None if out_dtype == torch.float16 else 0.0

    def check(self, name: str, tensor: torch.Tensor, cast_from: torch.dtype | None, merged: bool) -> None:
        """`tensor` as written; `cast_from` is the dtype it was cast from (None when it was not cast)."""
        narrowed = self.out_dtype == torch.float16 and cast_from not in (None, torch.float16)
        if not (merged or narrowed or self.max_abs is not None) or not tensor.numel():
            return
        # NaN propagates through min/max and ±Inf shows there (one fast pass; isfinite is ~50x slower).
        low, high = (v.item() for v in torch.aminmax(tensor))
        if math.isfinite(low) and math.isfinite(high):
            if self.max_abs is not None:
                self.max_abs = max(self.max_abs, abs(low), abs(high))
            return
        if narrowed and not merged:
            raise _Float16Overflow(
                f"The base tensor {name} in {self.base_dir} holds values beyond float16's range (±65504), "
                "so writing the model as float16 would turn them into Inf. Keep the base's own precision: "
                "drop --dtype float16 (a bfloat16 base that does not fit float16 stays bfloat16), or pass "
                "--dtype bfloat16.",
                name,
            )
        if narrowed:
            raise _Float16Overflow(
                f"Merging into {name} gives values beyond float16's range (±65504), which would be Inf in a "
                "float16 model. Pass --dtype bfloat16 (or drop --dtype float16) to keep them. Nothing was written.",
                name,
            )
        raise InputError(
            f"Merging into {name} produced NaN or Inf values: the adapter weights in {self.adapter_files} are "
            "corrupt or overflow. Nothing was written."
        )


def _write_merged(
    writer: StreamingShardWriter,
    name: str,
    tensor: torch.Tensor,
    plan: MergePlan,
    out_dtype: torch.dtype,
    watch: _RangeWatch,
    coverage: CoverageCheck,
) -> None:
    updates = plan.updates.get(name)
    source_dtype = tensor.dtype
    if updates:
        merged = tensor.to(torch.float32, copy=True)  # a working copy: updates apply in place
        for update in updates:
            merged = update.apply(merged)
        written = merged.to(out_dtype)
        # Checked after the cast, so values that overflow the output dtype are caught too.
        watch.check(name, written, source_dtype, merged=True)
        coverage.check(name, tensor, written)
        tensor = written
    elif tensor.is_floating_point():
        tensor = tensor.to(out_dtype)
        watch.check(name, tensor, source_dtype if source_dtype != out_dtype else None, merged=False)
    writer.write(name, tensor)


def _write_side_files(
    base_dir: Path,
    tokenizer_dir: Path,
    staging: Path,
    base_config: dict[str, Any],
    dtype: torch.dtype,
    config_changes: dict[str, Any],
) -> None:
    config = portable_config({**base_config, **config_changes}, str(dtype).removeprefix("torch."))
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    own_template = read_chat_template(tokenizer_dir) is not None
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name
        # The base's chat template must not override the one the adapter's tokenizer carries.
        if (
            not source.is_file()
            and tokenizer_dir != base_dir
            and not (own_template and name in CHAT_TEMPLATE_FILES)
        ):
            source = base_dir / name
        if source.is_file():
            shutil.copyfile(source, staging / name)
    _make_tokenizer_portable(staging)
    for name in PASSTHROUGH_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, staging / name)
    _follow_special_tokens(staging / "generation_config.json", config_changes)
    for entry in base_dir.iterdir():
        if entry.is_file() and LICENSE_PATTERN.match(entry.name):
            shutil.copyfile(entry, staging / entry.name)


def _follow_special_tokens(path: Path, config_changes: dict[str, Any]) -> None:
    """generation_config.json stops where the adapter's tokenizer does (its eos leads a list of them)."""
    changes = {
        k: v for k, v in config_changes.items() if k in ("eos_token_id", "bos_token_id", "pad_token_id")
    }
    if not changes or not path.is_file():
        return
    settings = json.loads(path.read_text())
    for key, token_id in changes.items():
        current = settings.get(key)
        if isinstance(current, list):
            settings[key] = [token_id, *(i for i in current if i != token_id)]
        else:
            settings[key] = token_id
    path.write_text(json.dumps(settings, indent=2) + "\n")


def _make_tokenizer_portable(folder: Path) -> None:
    """The merged folder's tokenizer files in the dialect transformers 4 and 5 and the converter all read.

    tokenizer_config.json loses the 5.x-only spellings, and a template kept only in chat_template.json (which
    the converter does not read) is also written as chat_template.jinja.
    """
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(
                f"The tokenizer's {config_file.name} is not valid JSON ({exc}); re-save the tokenizer with "
                "transformers' save_pretrained."
            ) from exc
        if isinstance(config, dict):
            portable = portable_tokenizer_config(config)
            if portable != config:
                config_file.write_text(json.dumps(portable, indent=2, ensure_ascii=False) + "\n")
    template = read_chat_template(folder)
    if isinstance(template, str) and read_chat_template(folder, include_processor=False) is None:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
