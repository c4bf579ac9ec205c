"""What a QLoRA adapter was trained on: the bitsandbytes 4-bit base, from the flags and from the inputs.

A QLoRA adapter learned its update on dequant(NF4(W16)), the 4-bit rounding of the 16-bit base that
bitsandbytes made when training started. Which rounding that was (NF4 or FP4, double quantization, block
size, compute dtype) is read from what the inputs say (a base's quantization_config, that of the base an
adapter recorded, the training config PEFT wrote into older model cards) and from --trained-on and its
companion flags, and checked against each other here, before any work.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from exporter.core.errors import InputError
from exporter.inputs.base_config import read_base_config, recorded_base_config
from exporter.inputs.options import QUANT_TYPES, QloraOptions

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
# bitsandbytes' BitsAndBytesConfig defaults, which a training script gets for what it leaves out.
BNB_DEFAULTS = {"double_quant": False, "block_size": 64, "compute_dtype": "float32"}
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


def recorded_four_bit(hint: str | None) -> bool:
    """Whether the recorded base is a bitsandbytes 4-bit model whose config is on this machine (a QLoRA
    adapter merge-quantize recognises)."""
    config = recorded_base_config(hint)
    if config is None:
        return False
    quantization = read_base_config(config.parent).get("quantization_config") or {}
    return trained_on_from_quantization_config(quantization, str(config)) is not None


def is_quantized_base(base_dir: Path) -> bool:
    """Whether the base's config.json describes a quantized model (it has a quantization_config)."""
    if not (base_dir / "config.json").is_file():
        return False
    return bool(read_base_config(base_dir).get("quantization_config"))


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
