"""QLoRA: what the adapter was trained on, that base rebuilt exactly, and the merge base chosen by loss.

A QLoRA adapter learned its update on dequant(NF4(W16)), the 4-bit rounding of the 16-bit base that
bitsandbytes made when training started, not on W16 itself. Two merges are then defensible:

    W16 + ΔW                  (Unsloth: keeps the base's full precision for llama.cpp's own quantization)
    dequant(NF4(W16)) + ΔW    (axolotl: the weights the adapter was trained against)

and no per-layer rule tells which is better for a given model, so the choice is measured: the
candidate with the lower loss on the evaluation data, by a paired comparison of the per-token
losses of both F16 GGUFs; W16 when the difference is within the error.

The rounding is bitsandbytes' own (the same functions its Linear4bit layer calls), so
dequant(NF4(W16)) here is bit for bit the weight the adapter saw in training.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import InputError
from exporter.options import QUANT_TYPES, QloraOptions
from exporter.preflight import read_base_config

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
# bitsandbytes' BitsAndBytesConfig defaults, which a training script gets for what it leaves out.
BNB_DEFAULTS = {"double_quant": False, "block_size": 64, "compute_dtype": "float32"}
# How many standard errors the mean loss difference must exceed before the dequantized base wins.
TIE_STANDARD_ERRORS = 2.0
README_MARKER = "bitsandbytes` quantization config was used during training"


@dataclass(frozen=True)
class TrainedOn:
    """The 4-bit base an adapter was trained on, as bitsandbytes made it."""

    quant_type: str = "nf4"
    double_quant: bool = False
    block_size: int = 64
    compute_dtype: str = "float32"
    skip_modules: tuple[str, ...] = ()  # modules bitsandbytes left in 16 bits beyond its own choice
    source: str = "--trained-on"

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise InputError(f"--trained-on {self.quant_type!r}: use nf4 or fp4 (bitsandbytes' 4-bit types).")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise InputError(
                f"--quant-compute-dtype {self.compute_dtype!r}: use one of {', '.join(COMPUTE_DTYPES)}."
            )
        if self.block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise InputError(
                f"--quant-block-size {self.block_size}: bitsandbytes quantizes in blocks of 32 to 4096 "
                "(a power of two); its default is 64."
            )

    def describe(self) -> str:
        return (
            f"{self.quant_type.upper()}{' + double quant' if self.double_quant else ''}, blocks of "
            f"{self.block_size}, compute {self.compute_dtype} ({self.source})"
        )

    def content(self) -> dict[str, Any]:
        """What the rounding depends on (cache keys name this, not where the facts came from)."""
        record = asdict(self)
        record.pop("source")
        record["skip_modules"] = list(self.skip_modules)
        return record


def trained_on_from_quantization_config(config: dict[str, Any], source: str) -> TrainedOn | None:
    """A bitsandbytes 4-bit quantization_config (a base's config.json, a model card) as TrainedOn."""
    if config.get("quant_method", "bitsandbytes") != "bitsandbytes" or not _truthy(
        config.get("load_in_4bit")
    ):
        return None
    compute = str(config.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch.")
    skip = config.get("llm_int8_skip_modules") or ()
    return TrainedOn(
        quant_type=str(config.get("bnb_4bit_quant_type") or "fp4"),
        double_quant=_truthy(config.get("bnb_4bit_use_double_quant")),
        compute_dtype=compute,
        skip_modules=tuple(skip) if isinstance(skip, list | tuple) else (),
        source=source,
    )


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() == "true"


def quantization_config_in_card(readme: Path) -> dict[str, Any] | None:
    """The "bitsandbytes quantization config was used during training" list PEFT's model cards carried
    (PEFT 0.4–0.6 wrote it into every adapter's README.md; many Hub adapters still have it)."""
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    start = text.find(README_MARKER)
    if start < 0:
        return None
    config: dict[str, Any] = {}
    for line in text[start:].splitlines()[1:]:
        match = re.match(r"\s*-\s*([a-z0-9_]+):\s*(.*?)\s*$", line)
        if match:
            config[match.group(1)] = match.group(2)
        elif config and line.strip():
            break
    return config or None


def detect_trained_on(base_dir: Path, adapter_dirs: list[Path]) -> TrainedOn | None:
    """What the inputs say about a 4-bit training base: the base's own quantization_config, that of the
    base an adapter recorded (base_model_name_or_path, when that folder or its Hub download is on this
    machine), or the training quantization config an adapter's model card recorded."""
    configs = [base_dir / "config.json"] + [_recorded_base_config(adapter) for adapter in adapter_dirs]
    for config_path in (path for path in configs if path is not None and path.is_file()):
        quantization = read_base_config(config_path.parent).get("quantization_config") or {}
        found = trained_on_from_quantization_config(quantization, str(config_path))
        if found is not None:
            return found
    for adapter in adapter_dirs:
        card = quantization_config_in_card(adapter / "README.md")
        if card is not None:
            found = trained_on_from_quantization_config(card, str(adapter / "README.md"))
            if found is not None:
                return found
    return None


def _recorded_base_config(adapter_dir: Path) -> Path | None:
    """config.json of the base adapter_config.json names, when it is on this machine."""
    try:
        hint = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
    return recorded_base_config(hint if isinstance(hint, str) else None)


def recorded_base_config(hint: str | None) -> Path | None:
    """config.json of the base an adapter recorded (base_model_name_or_path), when it is on this machine:
    a folder, or a download in the Hub cache."""
    if not hint:
        return None
    if Path(hint).is_dir():
        path = Path(hint) / "config.json"
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hint, "config.json")
    except Exception:  # noqa: BLE001 - an id that is not a valid repo name is simply not cached
        return None
    return Path(cached) if isinstance(cached, str) else None


def recorded_four_bit(hint: str | None) -> bool:
    """Whether the recorded base is a bitsandbytes 4-bit model whose config is on this machine (a QLoRA
    adapter merge-quantize recognises)."""
    config = recorded_base_config(hint)
    if config is None:
        return False
    quantization = read_base_config(config.parent).get("quantization_config") or {}
    return trained_on_from_quantization_config(quantization, str(config)) is not None


def is_quantized_base(base_dir: Path) -> bool:
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        return False
    return bool(json.loads(config_path.read_text()).get("quantization_config"))


def resolve_trained_on(options: QloraOptions, base_dir: Path, adapter_dirs: list[Path]) -> TrainedOn | None:
    """What the adapter was trained on: --trained-on (its settings over detected ones), else what the
    inputs say, else None (a plain LoRA: nothing of this module applies). A 4-bit base is the training
    base itself: taken only with --dequantize-base, and then its own quantization_config says it all."""
    detected = detect_trained_on(base_dir, adapter_dirs)
    if is_quantized_base(base_dir):
        if options.dequantize_base:
            return _four_bit_base(options, base_dir, detected)
        said = f"--trained-on {options.trained_on} was given, but " if options.trained_on else ""
        raise InputError(
            f"{said}{base_dir / 'config.json'} describes a quantized model (quantization_config), with no 16-bit "
            "weights to merge into or to rebuild the training base from. Pass the original fp16/bf16 base it was "
            "made from with --base"
            + (f" (the adapter was trained on {detected.describe()}: that is detected from this folder, or pass "
               f"--trained-on {detected.quant_type}{' --double-quant' if detected.double_quant else ''}), or, "
               "when only this 4-bit model exists, --dequantize-base to merge onto its dequantized weights."
               if detected else " and --trained-on nf4|fp4 to say how it was quantized in training.")
        )  # fmt: skip
    if options.dequantize_base:
        raise InputError(
            f"--dequantize-base was given, but {base_dir / 'config.json'} has no quantization_config: the base is "
            "already a 16-bit model. Leave --dequantize-base out (with --trained-on nf4|fp4 if the adapter is a "
            "QLoRA adapter)."
        )
    knobs = {
        "--double-quant": options.double_quant,
        "--quant-block-size": options.block_size,
        "--quant-compute-dtype": options.compute_dtype,
        "--merge-base": options.merge_base,
    }
    if options.trained_on is None and detected is None:
        given = [flag for flag, value in knobs.items() if value is not None]
        if given:
            raise InputError(
                f"{', '.join(given)} describe a QLoRA adapter's 4-bit training base, but nothing says this adapter "
                "was trained on one: pass --trained-on nf4 (or fp4) as well, or leave them out for a plain LoRA."
            )
        return None
    start = detected or TrainedOn(quant_type=options.trained_on or "nf4", **BNB_DEFAULTS)  # type: ignore[arg-type]
    return TrainedOn(
        quant_type=options.trained_on or start.quant_type,
        double_quant=start.double_quant if options.double_quant is None else options.double_quant,
        block_size=options.block_size or start.block_size,
        compute_dtype=options.compute_dtype or start.compute_dtype,
        skip_modules=start.skip_modules,
        source="--trained-on" if options.trained_on else start.source,
    )


def _four_bit_base(options: QloraOptions, base_dir: Path, detected: TrainedOn | None) -> TrainedOn:
    """--dequantize-base: the base is a bitsandbytes 4-bit model; its config says how it was quantized,
    and no flag may say otherwise (the weights are already rounded)."""
    config = base_dir / "config.json"
    if detected is None or detected.source != str(config):
        raise InputError(
            f"--dequantize-base: {config}'s quantization_config is not a bitsandbytes 4-bit one (load_in_4bit), "
            "the only quantized base edge-export can dequantize exactly. Pass the 16-bit base the model was made "
            "from with --base."
        )
    if options.merge_base == "w16":
        raise InputError(
            f"--merge-base w16 needs the 16-bit weights, and {base_dir} holds only 4-bit ones (--dequantize-base). "
            "Pass the 16-bit base with --base, or leave --merge-base out."
        )
    given = {
        "--trained-on": (options.trained_on, detected.quant_type),
        "--double-quant": (options.double_quant, detected.double_quant),
        "--quant-compute-dtype": (options.compute_dtype, detected.compute_dtype),
        "--quant-block-size": (options.block_size, None),
    }
    for flag, (value, actual) in given.items():
        if value is not None and value != actual:
            raise InputError(
                f"{flag} {value} was given with --dequantize-base, but the 4-bit base in {base_dir} is already "
                f"quantized ({detected.describe()}), and its saved blocks say how. Leave {flag} out."
            )
    return detected


def unpack_four_bit_base(base_dir: Path, target: Path) -> dict[str, Any]:
    """The 16-bit folder a bitsandbytes 4-bit model stands for: every packed weight dequantized by
    bitsandbytes (dequantize_4bit with the quant state saved beside it, as Linear4bit does in training)
    into the dtype it was quantized from, every other tensor and file as it is, the quantization_config
    dropped from config.json. Returns counts for the record."""
    import bitsandbytes.functional as bnb
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from exporter.safetensors_header import base_shard_files

    target.mkdir(parents=True)
    shards = base_shard_files(base_dir)
    for item in base_dir.iterdir():
        if item.is_file() and item not in shards and not item.name.endswith(".safetensors.index.json"):
            shutil.copyfile(item, target / item.name)
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    holder: dict[str, Path] = {}  # tensor name -> its shard (a weight's quant state may sit in another)
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            holder.update(dict.fromkeys(f.keys(), shard))
    packed = {n.split(".quant_state.")[0] for n in holder if ".quant_state.bitsandbytes__" in n}
    state_parts = {
        n for n in holder for w in [n.rsplit(".", 1)[0].removesuffix(".quant_state")] if w in packed
    }

    def read(name: str) -> Any:
        with safe_open(str(holder[name]), "pt") as f:
            return f.get_tensor(name)

    unpacked = 0
    weight_map: dict[str, str] = {}
    for shard in shards:
        tensors = {}
        for name in [n for n, s in holder.items() if s == shard and n not in state_parts]:
            tensor = read(name)
            if name in packed:
                parts = {p[len(name) + 1 :]: read(p) for p in state_parts if p.startswith(name + ".")}
                state = bnb.QuantState.from_dict(parts, device=torch.device("cpu"))
                tensor = bnb.dequantize_4bit(tensor, state).contiguous()
                unpacked += 1
            tensors[name] = tensor
        save_file(tensors, str(target / shard.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if unpacked == 0:
        raise InputError(
            f"{base_dir}'s config.json says it is a bitsandbytes 4-bit model, but its safetensors hold no packed "
            "4-bit weight (no '.quant_state.bitsandbytes__nf4/fp4' entries). Pass the 16-bit base with --base."
        )
    return {"unpacked_weights": unpacked}


# --------------------------------------------------------------------------- the rounding


def quantized_weight_names(base_dir: Path, trained_on: TrainedOn) -> set[str]:
    """The weights bitsandbytes turned into 4-bit ones when the base was loaded for training: every
    nn.Linear except the modules transformers keeps in 16 bits (the output head) and skip_modules."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # transformers' own choice (quantizer_bnb_4bit.py), so the rounded set is exactly the trained one
    skip = HfQuantizer.get_modules_to_not_convert(
        model, list(trained_on.skip_modules) or None, model._keep_in_fp32_modules
    )
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and should_convert_module(name, skip):
            names.add(f"{name}.weight")
    return names


def round_trip(weight: Any, trained_on: TrainedOn) -> Any:
    """dequant(Q4(weight)) in float32, by bitsandbytes' own functions (those Linear4bit calls)."""
    import bitsandbytes.functional as bnb

    data, state = bnb.quantize_4bit(
        weight.float().contiguous(),
        blocksize=trained_on.block_size,
        compress_statistics=trained_on.double_quant,
        quant_type=trained_on.quant_type,
    )
    return bnb.dequantize_4bit(data, state)


def round_to_training_base(model: Any, base_dir: Path, trained_on: TrainedOn) -> int:
    """Give a loaded 16-bit model the weights its 4-bit layers had in training: dequant(Q4(W)) in their
    compute dtype, which is what a Linear4bit layer multiplies by when training (bitsandbytes
    dequantizes, then a plain matmul; on CPU its eval-mode kernels compute in bfloat16 instead, so the
    4-bit model itself is not used). W is read from the base's files, as the training load read it."""
    import torch
    from safetensors import safe_open

    from exporter.safetensors_header import base_shard_files

    names = quantized_weight_names(base_dir, trained_on)
    parameters = dict(model.named_parameters())
    compute = getattr(torch, trained_on.compute_dtype)
    rounded = 0
    with torch.no_grad():
        for shard in base_shard_files(base_dir):
            with safe_open(str(shard), "pt") as tensors:
                for name in [n for n in tensors.keys() if n in names and n in parameters]:  # noqa: SIM118
                    parameter = parameters[name]
                    approx = round_trip(tensors.get_tensor(name), trained_on).to(compute)
                    parameter.copy_(approx.to(parameter.dtype))
                    rounded += 1
    if rounded != len(names):
        raise InputError(
            f"Only {rounded} of the {len(names)} weights bitsandbytes quantizes were found in {base_dir}'s "
            "safetensors under the names the model uses; the model as trained cannot be rebuilt from it."
        )
    return rounded


def write_dequantized_base(base_dir: Path, target: Path, trained_on: TrainedOn) -> dict[str, Any]:
    """A copy of the 16-bit base whose 4-bit-trained weights are replaced by dequant(Q4(W)), in the
    base's own dtype; every other file is copied as it is. Returns counts for the record."""
    import torch
    from safetensors.torch import load_file, save_file

    from exporter.safetensors_header import base_shard_files

    names = quantized_weight_names(base_dir, trained_on)
    target.mkdir(parents=True)
    shards = base_shard_files(base_dir)
    for item in base_dir.iterdir():
        if item.is_file() and item not in shards:
            shutil.copyfile(item, target / item.name)
    rounded = 0
    error = 0.0
    for shard in shards:
        tensors = load_file(str(shard))
        for name in [n for n in tensors if n in names]:
            original = tensors[name]
            approx = round_trip(original, trained_on)
            error += float(torch.linalg.vector_norm(approx - original.float()) ** 2)
            tensors[name] = approx.to(original.dtype).contiguous()
            rounded += 1
        save_file(tensors, str(target / shard.name), metadata={"format": "pt"})
    if rounded == 0:
        raise InputError(
            f"No weight of {base_dir} is one bitsandbytes quantizes (nn.Linear layers): this base cannot be the "
            "16-bit base of a 4-bit training run. Check --base, or leave --trained-on out."
        )
    return {"rounded_weights": rounded, "rounding_rms": math.sqrt(error)}


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class MergeBaseDecision:
    """Which merge base was kept, and the paired loss comparison (or the user's word) behind it."""

    chosen: str  # "w16" or "dequant"
    mode: str  # "auto", or "w16"/"dequant" when forced
    trained_on: TrainedOn
    loss: dict[str, float]  # candidate -> mean loss (nats/token) of its F16 GGUF; empty when forced
    difference: float | None = None  # mean(loss_dequant - loss_w16) per token
    difference_se: float | None = None
    tokens: int = 0
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["trained_on"] = {**self.trained_on.content(), "source": self.trained_on.source}
        record["tie_standard_errors"] = TIE_STANDARD_ERRORS
        return record


def compare_losses(nll_w16: np.ndarray, nll_dequant: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the per-token loss difference dequant − W16 (the same tokens)."""
    diff = nll_dequant.astype(np.float64) - nll_w16.astype(np.float64)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(diff.mean()), se


def decide_merge_base(
    nll_w16: np.ndarray, nll_dequant: np.ndarray, trained_on: TrainedOn
) -> MergeBaseDecision:
    """The candidate with the lower loss; W16 unless dequant is lower by more than TIE_STANDARD_ERRORS SE."""
    mean, se = compare_losses(nll_w16, nll_dequant)
    loss = {"w16": float(nll_w16.mean()), "dequant": float(nll_dequant.mean())}
    if mean < -TIE_STANDARD_ERRORS * se:
        chosen, why = "dequant", "lower loss than W16 beyond the error"
    elif mean > TIE_STANDARD_ERRORS * se:
        chosen, why = "w16", "lower loss than dequant beyond the error"
    else:
        chosen, why = "w16", f"a tie within {TIE_STANDARD_ERRORS:g} standard errors: W16 is kept"
    reason = f"dequant − W16 = {mean:+.4f} ± {se:.4f} nats/token over {len(nll_w16)} tokens: {why}"
    return MergeBaseDecision(chosen, "auto", trained_on, loss, mean, se, len(nll_w16), reason)
