"""Merge LoRA adapters into a 16-bit base, tensor by tensor, without loading the whole model.

W' = W + Σ_i weight_i · scale_i · B_i A_i, computed in fp32 and cast to the output dtype. Base
shards are memory-mapped and read one tensor at a time; output shards are flushed as soon as they
reach the size limit, so the working set is one output shard plus one tensor, whatever the model
size. Everything is checked (module names, shapes, config) before any output is written, and the
output folder appears only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from exporter.adapter import ADAPTER_CONFIG, LoraAdapter
from exporter.errors import InputError

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}
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
PASSTHROUGH_FILES = ("generation_config.json",)
LICENSE_PATTERN = re.compile(r"^(LICEN[CS]E|NOTICE|USE_POLICY)(\.\w+)?$", re.IGNORECASE)
DEFAULT_SHARD_BYTES = 2 << 30


@dataclass(frozen=True)
class LoraDelta:
    """One adapter's low-rank update to one base tensor."""

    lora_a: torch.Tensor  # r × in
    lora_b: torch.Tensor  # out × r
    scale: float  # adapter weight · alpha / r (or / √r for rsLoRA)
    fan_in_fan_out: bool

    def delta(self) -> torch.Tensor:
        product = self.lora_b.float() @ self.lora_a.float()
        if self.fan_in_fan_out:
            product = product.T
        return product * self.scale


@dataclass(frozen=True)
class MergePlan:
    """Which base tensors change, checked against the base before anything is written."""

    deltas: dict[str, list[LoraDelta]]  # base tensor name -> updates


@dataclass(frozen=True)
class MergeResult:
    path: Path
    merged_tensors: int
    total_tensors: int
    dtype: str
    shards: int


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name or its dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def lora_scale(config: dict[str, Any], module_name: str) -> tuple[int, float]:
    """(rank, scaling) for one module exactly as PEFT computes it."""
    rank = int(pattern_value(config.get("rank_pattern") or {}, module_name, config.get("r", 8)))
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module_name, config.get("lora_alpha", 8)))
    if config.get("use_rslora"):
        return rank, alpha / math.sqrt(rank)
    return rank, alpha / rank


def load_adapter_tensors(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    if adapter.weights.suffix == ".safetensors":
        try:
            return load_file(str(adapter.weights))
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise InputError(
                f"{adapter.weights} could not be read as safetensors ({exc}); the file is truncated or "
                "corrupt. Re-save the adapter with PEFT's save_pretrained."
            ) from exc
    # Only reached with --allow-pickle: weights_only refuses arbitrary objects.
    return torch.load(adapter.weights, map_location="cpu", weights_only=True)


def plan_adapter(adapter: LoraAdapter, base_shapes: dict[str, tuple[int, ...]]) -> dict[str, LoraDelta]:
    """Map one adapter's tensors onto base tensor names, checking type, features and shapes."""
    config = adapter.config
    where = adapter.path / ADAPTER_CONFIG
    if adapter.peft_type != "LORA":
        raise InputError(
            f"{where} is a {adapter.peft_type} adapter; edge-export merges LoRA adapters. "
            "Prefix and prompt tuning cannot be merged into weights at all; export such adapters another way."
        )
    unsupported = []
    if config.get("use_dora"):
        unsupported.append("DoRA (use_dora)")
    if config.get("modules_to_save"):
        unsupported.append("modules_to_save")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        unsupported.append("trained biases")
    if unsupported:
        raise InputError(f"{where} uses {', '.join(unsupported)}, which this merge does not handle yet.")
    tensors = load_adapter_tensors(adapter)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = re.match(r"^(.*)\.lora_([AB])(?:\.default)?\.weight$", name)
        if not match:
            raise InputError(
                f"{adapter.weights} holds tensor {key!r}, which is not a LoRA A/B matrix this merge handles."
            )
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not pairs:
        raise InputError(f"{adapter.weights} holds no LoRA tensors; the adapter is empty.")
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    deltas = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise InputError(
                f"{adapter.weights}: module {module} has lora_{''.join(pair)} but not both A and B."
            )
        target = f"{module}.weight"
        if target not in base_shapes:
            raise InputError(
                f"{adapter.weights} changes {target}, which the base model does not have: the adapter was "
                "trained for a different base. Pass the matching --base."
            )
        rank, scale = lora_scale(config, module)
        lora_a, lora_b = pair["A"], pair["B"]
        out_dim, in_dim = base_shapes[target] if not fan_in_fan_out else base_shapes[target][::-1]
        if lora_a.shape != (rank, in_dim) or lora_b.shape != (out_dim, rank):
            raise InputError(
                f"{adapter.weights}: {module} has lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)}, "
                f"which do not fit the base tensor {target} {base_shapes[target]} at rank {rank}: the adapter "
                "was trained for a different base (or its config's r / rank_pattern is wrong). Pass the matching --base."
            )
        deltas[target] = LoraDelta(lora_a, lora_b, adapter.weight * scale, fan_in_fan_out)
    return deltas


def check_configs(adapter: LoraAdapter, base_config: dict[str, Any], base_dir: Path) -> None:
    """Refuse an adapter whose recorded base differs in shape from this base."""
    hint = adapter.base_model_name_or_path
    if hint and Path(hint).is_dir() and (Path(hint) / "config.json").is_file():
        trained = json.loads((Path(hint) / "config.json").read_text())
        for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if key in trained and key in base_config and trained[key] != base_config[key]:
                raise InputError(
                    f"{adapter.path / ADAPTER_CONFIG} was trained on {hint} ({key}={trained[key]}), but the base "
                    f"{base_dir} has {key}={base_config[key]}. Pass the base the adapter was trained on."
                )


class BaseModelShards:
    """The base's safetensors shards, opened lazily one at a time."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        index_file = base_dir / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            self.files = sorted({base_dir / f for f in weight_map.values()})
        else:
            self.files = sorted(base_dir.glob("*.safetensors"))
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for file in self.files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                        view = handle.get_slice(key)
                        self.shapes[key] = tuple(view.get_shape())
                        self.dtypes[key] = view.get_dtype()
            except Exception as exc:
                raise InputError(
                    f"{file} could not be read as safetensors ({exc}); the file is truncated or corrupt. "
                    "Re-download or re-save the base model."
                ) from exc

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    yield key, handle.get_tensor(key)


class ShardWriter:
    """Writes tensors into safetensors shards of bounded size, flushing each when full."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.written):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> int:
        """Give shards their final names and write the index when there is more than one."""
        self.flush()
        count = len(self.written)
        if count == 1:
            self.written[0][0].rename(self.folder / "model.safetensors")
            return 1
        weight_map = {}
        for number, (path, names) in enumerate(self.written, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return count


def tokenizer_source(adapters: list[LoraAdapter], base_dir: Path) -> Path:
    """Trainers save the tokenizer they trained with next to the adapter; prefer it over the base's."""
    for adapter in adapters:
        if (adapter.path / "tokenizer_config.json").is_file():
            return adapter.path
    return base_dir


def merge_adapters(
    base_dir: Path,
    adapters: list[LoraAdapter],
    out_dir: Path,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> MergeResult:
    """Merge `adapters` into the base at `base_dir` and write a complete HF folder at `out_dir`."""
    base_config = json.loads((base_dir / "config.json").read_text())
    shards = BaseModelShards(base_dir)
    plan: dict[str, list[LoraDelta]] = {}
    for adapter in adapters:
        check_configs(adapter, base_config, base_dir)
        for target, delta in plan_adapter(adapter, shards.shapes).items():
            plan.setdefault(target, []).append(delta)

    out_dtype = _output_dtype(dtype, shards)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary model folder
    try:
        writer = ShardWriter(staging, max_shard_bytes)
        for name, tensor in shards.tensors():
            if name in plan:
                merged = tensor.float()
                for delta in plan[name]:
                    merged += delta.delta()
                if not torch.isfinite(merged).all():
                    raise InputError(
                        f"Merging into {name} produced NaN or Inf values: the adapter weights in "
                        f"{', '.join(str(a.weights) for a in adapters)} are corrupt or overflow. Nothing was written."
                    )
                tensor = merged
            if tensor.is_floating_point():
                tensor = tensor.to(out_dtype)
            writer.add(name, tensor)
        shard_count = writer.finish()
        _write_side_files(base_dir, tokenizer_source(adapters, base_dir), staging, base_config, out_dtype)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return MergeResult(
        out_dir, len(plan), len(shards.shapes), str(out_dtype).removeprefix("torch."), shard_count
    )


def _output_dtype(requested: str | None, shards: BaseModelShards) -> torch.dtype:
    if requested:
        if requested.lower() not in DTYPES:
            raise InputError(
                f"--dtype {requested!r} is not supported; use one of float16, bfloat16, float32."
            )
        return DTYPES[requested.lower()]
    float_dtypes = {d for d in shards.dtypes.values() if d in ("F16", "BF16", "F32")}
    if float_dtypes == {"BF16"}:
        return torch.bfloat16
    if "F32" in float_dtypes and "F16" not in float_dtypes and "BF16" not in float_dtypes:
        log.warning("%s is stored in float32; writing the merged model as float16", shards.base_dir)
    return torch.float16


def _write_side_files(
    base_dir: Path, tokenizer_dir: Path, staging: Path, base_config: dict[str, Any], dtype: torch.dtype
) -> None:
    config = dict(base_config)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name
        if not source.is_file() and tokenizer_dir != base_dir:
            source = base_dir / name
        if source.is_file():
            shutil.copyfile(source, staging / name)
    for name in PASSTHROUGH_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, staging / name)
    for entry in base_dir.iterdir():
        if entry.is_file() and LICENSE_PATTERN.match(entry.name):
            shutil.copyfile(entry, staging / entry.name)
