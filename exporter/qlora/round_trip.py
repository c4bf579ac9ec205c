"""bitsandbytes' 4-bit round trip: the base as a QLoRA adapter saw it in training, dequant(Q4(W16)).

The rounding is bitsandbytes' own (the same functions its Linear4bit layer calls), so dequant(NF4(W16))
here is bit for bit the weight the adapter saw in training.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from exporter.core.errors import InputError
from exporter.inputs.trained_on import TrainedOn


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

    from exporter.inputs.safetensors_header import base_shard_files

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

    from exporter.inputs.safetensors_header import base_shard_files

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
