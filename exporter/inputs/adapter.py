"""Read a PEFT adapter folder and find the base model it belongs to."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from exporter.core.errors import InputError
from exporter.core.jsonfile import read_json_object
from exporter.core.paths import cache_root
from exporter.inputs.adapter_keys import check_adapter_keys
from exporter.inputs.mlx_adapter import is_mlx_adapter, translate

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT adapter folder: its config and the path of its weights."""

    path: Path
    config: dict[str, Any]
    weights: Path
    weight: float = 1.0  # how much of this adapter's delta to add (W + weight * ΔW)
    training_only_keys: tuple[str, ...] = field(default=())  # set, but without effect on the weights
    origin: Path | None = None  # the folder the user named, when `path` is its PEFT translation (mlx-lm)

    @property
    def folder(self) -> Path:
        """The adapter folder as the user named it (names, manifests, output checks)."""
        return self.origin or self.path

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "LORA")).upper()

    @property
    def base_model_name_or_path(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None


def read_adapter(path: Path, weight: float = 1.0, allow_pickle: bool = False) -> LoraAdapter:
    """Validate an adapter folder and read its config; the weights are read lazily by the merge."""
    if not path.is_dir():
        raise InputError(
            f"The adapter folder {path} does not exist or is not a folder. Pass the folder that "
            f"holds {ADAPTER_CONFIG} and {SAFETENSORS_WEIGHTS} (what PEFT's save_pretrained writes)."
        )
    if is_mlx_adapter(path):
        translated = read_adapter(translate(path, cache_root()), weight)
        return replace(translated, origin=path)
    config_file = path / ADAPTER_CONFIG
    checkpoints = trainer_checkpoints(path)
    if not config_file.is_file() and checkpoints:
        raise InputError(
            f"{path} holds no final adapter, only the trainer's checkpoints "
            f"({', '.join(c.name for c in checkpoints)}). Pass the checkpoint to export, e.g. --adapter "
            f"{checkpoints[-1]} (the latest), or save the final adapter there (trainer.save_model)."
        )
    if not config_file.is_file():
        raise InputError(
            f"{config_file} is missing, so {path} is not a PEFT adapter folder. Point --adapter at the "
            "folder PEFT's save_pretrained wrote (it holds adapter_config.json and adapter_model.safetensors)."
        )
    config = read_json_object(config_file, "re-save the adapter with PEFT.")
    weights = path / SAFETENSORS_WEIGHTS
    if not weights.is_file():
        pickled = path / PICKLE_WEIGHTS
        if pickled.is_file() and not allow_pickle:
            raise InputError(
                f"{path} holds its weights only as {PICKLE_WEIGHTS}, a pickle file that can run code when "
                "loaded. Convert it to adapter_model.safetensors (PeftModel.save_pretrained with "
                "safe_serialization=True), or pass --allow-pickle to load it with torch.load(weights_only=True)."
            )
        native = sorted(p.name for p in path.glob("adapter*.pt"))
        if native and not pickled.is_file():
            raise InputError(
                f"{path} holds its adapter only as {native[0]}, torchtune's own checkpoint format (a pickle, "
                "with torchtune's module names and q/k layout). Convert it to PEFT's format with torchtune "
                "(torchtune.models.convert_weights.tune_to_peft_adapter_weights and tune_to_peft_adapter_config, "
                "saved with safetensors), or train with checkpointer FullModelHFCheckpointer, which writes "
                "adapter_model.safetensors and adapter_config.json beside it."
            )
        if not pickled.is_file():
            raise InputError(
                f"{path} has no adapter weights: neither {SAFETENSORS_WEIGHTS} nor {PICKLE_WEIGHTS} exists. "
                "Point --adapter at the folder PEFT's save_pretrained wrote."
            )
        weights = pickled
    peft_type = str(config.get("peft_type", "LORA")).upper()
    training_only = tuple(check_adapter_keys(config_file, config, peft_type))
    if training_only:
        log.debug("%s: settings without effect on the weights: %s", config_file, ", ".join(training_only))
    return LoraAdapter(
        path=path, config=config, weights=weights, weight=weight, training_only_keys=training_only
    )


def trainer_checkpoints(path: Path) -> list[Path]:
    """The checkpoint-<step> folders a Trainer (TRL, transformers) saved in `path` that hold an adapter,
    by step. Their optimizer, scheduler and training_args.bin (pickles) are never read."""
    found = [
        folder
        for folder in path.glob("checkpoint-*")
        if folder.name.removeprefix("checkpoint-").isdigit() and (folder / ADAPTER_CONFIG).is_file()
    ]
    return sorted(found, key=lambda folder: int(folder.name.removeprefix("checkpoint-")))


def parse_adapter_argument(value: str) -> tuple[Path, float]:
    """`DIR` or `DIR:WEIGHT` (the weight is a float; a DIR containing ':' needs the weight spelled out)."""
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(value), 1.0


def resolve_base(reference: str | None, adapter: LoraAdapter) -> Path:
    """The base model folder: a local directory, or a Hugging Face id found in the local cache."""
    if reference is None:
        reference = adapter.base_model_name_or_path
        if reference is None:
            raise InputError(
                f"{adapter.path / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path "
                "is empty). Pass --base with the base model's folder or Hugging Face id."
            )
    local = Path(reference).expanduser()
    if local.is_dir():
        return _check_base_dir(local)
    if local.is_absolute() or reference.startswith((".", "~")) or reference.count("/") > 1:
        raise InputError(
            f"The base model folder {reference} does not exist. Pass --base with the folder that holds "
            "the base's config.json and safetensors weights."
        )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        snapshot = snapshot_download(reference, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise InputError(
            f"The base model {reference!r} is neither a local folder nor in the local Hugging Face cache, "
            "and edge-export never downloads at run time. Download it once (huggingface-cli download "
            f"{reference}) or pass --base with a local folder."
        ) from exc
    return _check_base_dir(Path(snapshot))


def _check_base_dir(path: Path) -> Path:
    if (path / ADAPTER_CONFIG).is_file():
        raise InputError(
            f"{path} holds {ADAPTER_CONFIG} beside a model, so it is not a plain base: transformers would load "
            "that adapter onto the model it reads there (torchtune's epoch folders hold the model it merged and "
            "the adapter). Pass the base the adapter was trained on as --base, and the folder as --adapter."
        )
    if not (path / "config.json").is_file():
        raise InputError(
            f"{path / 'config.json'} is missing, so {path} is not a Hugging Face model folder. Pass --base "
            "with the folder that holds the base model's config.json and weights."
        )
    if not any(path.glob("*.safetensors")):
        raise InputError(
            f"{path} has no .safetensors weights. edge-export reads base weights only from safetensors "
            "(never pickles by default); convert the base with transformers' save_pretrained(safe_serialization=True)."
        )
    return path


# License files a model folder carries; the merge copies them, Modelfiles quote them.
LICENSE_PATTERN = re.compile(r"^(LICEN[CS]E|NOTICE|USE_POLICY)(\.\w+)?$", re.IGNORECASE)


def tokenizer_source(adapters: list[LoraAdapter], base_dir: Path) -> Path:
    """Trainers save the tokenizer they trained with next to the adapter; prefer it over the base's."""
    for adapter in adapters:
        if (adapter.path / "tokenizer_config.json").is_file():
            return adapter.path
    return base_dir
