"""Vision-language bases: what makes a base one, and what its export needs that a text model's does not.

A vision-language model (SmolVLM / Idefics3, Gemma-3 4B and up, Qwen2.5-VL, LLaVA-style models) is one
config.json with a `vision_config` beside its language model's. llama.cpp runs it as two GGUFs: the
language model, converted as any text model, and the multimodal projector (the vision tower and the
projector into the language model, `convert_hf_to_gguf.py --mmproj`), which libmtmd and `llama-server
--mmproj` load beside it. The projector's converter reads the image processor's settings (its mean and
standard deviation, the image size) from preprocessor_config.json or processor_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exporter.core.errors import InputError

# The projector's GGUF types: the converter's own choice per tensor (norms and positions stay F32).
MMPROJ_TYPES = ("F16", "Q8_0")
DEFAULT_MMPROJ_TYPE = "F16"
# Where transformers saves an image processor's settings (5.x: inside processor_config.json).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
IMAGE_PROCESSOR_KEYS = ("image_mean", "image_std")


# Where the pinned converter finds a family's vision tower in the stored names: the released checkpoints'
# layout. transformers 5 saves Gemma-3 without the `vision_model.` level, which the converter cannot map.
CONVERTER_VISION_PREFIXES = {"gemma3": ("vision_tower.vision_model.", "vision_tower.")}


# Module names of a vision tower or projector (SmolVLM, Gemma-3, Qwen-VL, LLaVA-style), as adapters name them.
VISION_MODULE_MARKERS = (
    "vision_tower.",
    "vision_model.",
    "connector.",
    "multi_modal_projector.",
    "mm_projector.",
    "visual.",
)


def vision_tensors(names: list[str]) -> list[str]:
    """The adapter tensors among `names` that train a vision tower or a projector, not the language model."""
    return [n for n in names if any(marker in n for marker in VISION_MODULE_MARKERS)]


def is_vision_language(config: dict[str, Any]) -> bool:
    """A base with a vision tower: its config.json has a `vision_config`."""
    return isinstance(config.get("vision_config"), dict)


def auto_model_class(base_dir: Path) -> Any:
    """transformers' auto class that loads the base with its language-model head: the image-text-to-text
    class for a vision-language model (its vision tower included), else the causal-LM class."""
    import transformers

    from exporter.inputs.base_config import read_base_config

    if is_vision_language(read_base_config(base_dir)):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def text_architecture(config: dict[str, Any]) -> str | None:
    """The architecture llama.cpp's converter converts the language model as: the text config's own
    `architectures` where it names one, else the model's (as the converter's get_model_architecture reads)."""
    for source in (config.get("text_config") or {}, config):
        names = source.get("architectures") if isinstance(source, dict) else None
        if names:
            return str(names[0])
    return None


def mmproj_type(value: str) -> str:
    """--mmproj-type, checked: F16 or Q8_0 (any case)."""
    upper = value.upper()
    if upper not in MMPROJ_TYPES:
        raise InputError(
            f"--mmproj-type {value!r} is not a type the projector is written in. Give one of "
            f"{', '.join(MMPROJ_TYPES)} (F16 is the default and the exact one; Q8_0 halves the file)."
        )
    return upper


def image_processor_settings(base_dir: Path) -> dict[str, Any]:
    """The image processor's settings as llama.cpp's converter reads them: preprocessor_config.json, then
    processor_config.json (whose `image_processor` section counts as its top level)."""
    settings: dict[str, Any] = {}
    for name in PROCESSOR_FILES:
        path = base_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{path} is not readable JSON ({exc}). Save the model's processor again "
                "(processor.save_pretrained) into that folder."
            ) from exc
        if isinstance(data, dict):
            settings.update({**data, **(data.get("image_processor") or {})})
    return settings


def check_vision_base(
    base_dir: Path,
    config: dict[str, Any],
    text_architectures: frozenset[str],
    mmproj_architectures: frozenset[str],
    revision: str,
) -> None:
    """Refuse a vision-language base whose two GGUFs the pinned converter cannot both write, before any work:
    its vision side must be one the converter writes a projector for, its language model one it converts,
    and its image processor's settings must be in the folder."""
    config_file = base_dir / "config.json"
    named = [str(a) for a in config.get("architectures") or []]
    if not any(a in mmproj_architectures for a in named):
        families = ", ".join(sorted(a for a in mmproj_architectures if "ForConditionalGeneration" in a)[:12])
        raise InputError(
            f"{config_file} is a vision-language model ({', '.join(named) or 'no architectures named'} with a "
            f"vision_config), and the converter of {revision} cannot write its multimodal projector (mmproj): "
            f"the image side would be lost. It writes projectors for {families} and others. Export a "
            "fine-tune of one of those, or a newer edge-export release that pins a newer llama.cpp."
        )
    text = text_architecture(config)
    if text not in text_architectures:
        raise InputError(
            f"The language model of {config_file} is {text or 'not named'} (text_config.architectures, else "
            f"architectures), which the converter of {revision} cannot convert. Name the language model's "
            'architecture in text_config, e.g. "architectures": ["LlamaForCausalLM"] for SmolVLM, as the '
            "released checkpoints do."
        )
    _check_vision_names(base_dir, config, revision)
    settings = image_processor_settings(base_dir)
    missing = [key for key in IMAGE_PROCESSOR_KEYS if key not in settings]
    if missing:
        raise InputError(
            f"{base_dir} has no image processor settings ({', '.join(missing)} missing from "
            f"{' and '.join(PROCESSOR_FILES)}): the projector's GGUF records how images are normalised, and the "
            "check feeds images through the model's own processor. Save the processor into the base folder "
            "(AutoProcessor.from_pretrained(original).save_pretrained(base))."
        )


def _check_vision_names(base_dir: Path, config: dict[str, Any], revision: str) -> None:
    """Refuse a vision tower stored under names the pinned converter cannot map (a Gemma-3 checkpoint saved
    by transformers 5, without the released checkpoints' `vision_model.` level)."""
    from exporter.inputs.safetensors_header import base_shard_files, read_header

    prefixes = CONVERTER_VISION_PREFIXES.get(str(config.get("model_type")))
    if prefixes is None:
        return
    expected, tower = prefixes
    names = [entry.name for shard in base_shard_files(base_dir) for entry in read_header(shard)]
    stray = next((n for n in names if n.startswith(tower) and not n.startswith(expected)), None)
    if stray is not None:
        raise InputError(
            f"{base_dir} stores its vision tower as {stray} (the layout transformers 5 saves), and the converter "
            f"of {revision} maps only the released checkpoints' names ({expected}…), so the projector cannot be "
            "written. Pass the released checkpoint (as downloaded from the Hub) as --base: the adapter merges "
            "into it the same."
        )
