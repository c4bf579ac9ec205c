"""The command line's option groups, declared once: every command takes the same flags the same way.

`@with_options(INPUTS, OUTPUT, …)` adds a group's flags to a typer command and hands the command the
group's typed, validated options object (exporter.options) instead of the loose values, the way
mergekit's `add_merge_options` does for click.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from exporter.adapter import parse_adapter_argument
from exporter.locks import LockPolicy
from exporter.ollama_targets import CURRENT_OLLAMA
from exporter.options import (
    DEFAULT_CALIBRATION_TOKENS,
    InputOptions,
    OutputOptions,
    ProfileOptions,
    QloraOptions,
    QualityOptions,
    RunOptions,
)

Values = dict[str, Any]


@dataclass(frozen=True)
class Flag:
    name: str  # the command function's keyword
    annotation: Any  # Annotated[type, typer.Option(...)]
    default: Any = inspect.Parameter.empty


@dataclass(frozen=True)
class OptionGroup:
    """Flags that together make one options object, handed to the command as `target`."""

    target: str
    flags: tuple[Flag, ...]
    build: Callable[[Values], Any]

    def without(self, *names: str) -> OptionGroup:
        """The group without some flags (their options take their defaults)."""
        return OptionGroup(self.target, tuple(f for f in self.flags if f.name not in names), self.build)


def with_options(*groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add each group's flags to a typer command; the command receives one options object per group."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        targets = {group.target for group in groups}
        own = [
            p.replace(annotation=_resolved(p.annotation, command), kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(command).parameters.values()
            if p.name not in targets
        ]
        added = [
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.annotation
            )
            for group in groups
            for f in group.flags
        ]
        flag_names = [f.name for group in groups for f in group.flags]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in flag_names}
            for group in groups:
                kwargs[group.target] = group.build(values)
            return command(**kwargs)

        parameters = sorted(own + added, key=lambda p: p.default is not inspect.Parameter.empty)
        wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        del wrapper.__wrapped__  # typer must read the signature above, not the command's
        return wrapper

    return decorate


def _resolved(annotation: Any, command: Callable[..., Any]) -> Any:
    """A string annotation (postponed evaluation) as the object it names in the command's module."""
    return eval(annotation, command.__globals__) if isinstance(annotation, str) else annotation  # noqa: S307


def parse_size(text: str) -> int:
    """`2GB`, `500MB`, `1000000` as bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a size; write e.g. 2GB, 500MB or 1000000")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


def _opt(kind: Any, *names: str, **settings: Any) -> Any:
    return Annotated[kind, typer.Option(*names, **settings)]


INPUTS = OptionGroup(
    "inputs",
    (
        Flag(
            "adapter",
            _opt(
                list[str],
                "--adapter",
                help="PEFT adapter folder; DIR:WEIGHT adds it with a weight. Repeat for several.",
            ),
        ),
        Flag(
            "base",
            _opt(
                str | None,
                "--base",
                help="Base model folder or Hugging Face id (local cache only). "
                "Default: base_model_name_or_path from adapter_config.json.",
            ),
            None,
        ),
        Flag(
            "allow_pickle",
            _opt(
                bool,
                "--allow-pickle",
                help="Accept a pickle adapter_model.bin (loaded with weights_only=True).",
            ),
            False,
        ),
        Flag(
            "trust_remote_code",
            _opt(
                bool,
                "--trust-remote-code",
                help="Allow a base whose config.json has auto_map to run its own Python code.",
            ),
            False,
        ),
    ),
    lambda v: InputOptions(
        adapters=tuple(parse_adapter_argument(a) for a in v["adapter"]),
        base=v["base"],
        allow_pickle=v["allow_pickle"],
        trust_remote_code=v["trust_remote_code"],
    ),
)

OUTPUT = OptionGroup(
    "output",
    (
        Flag("out", _opt(Path, "--out", help="Output folder (GGUFs, Modelfiles, manifest.json, reports).")),
        Flag("name", _opt(str | None, "--name", help="Model name used in file names."), None),
        Flag("force", _opt(bool, "--force", help="Replace an earlier export in --out."), False),
        Flag(
            "ollama_version",
            _opt(
                str,
                "--ollama-version",
                help=f"The Ollama release the Modelfiles are for (default {CURRENT_OLLAMA}); 0.30+ renders "
                "the GGUF's own template, older ones only the Modelfile's TEMPLATE.",
            ),
            CURRENT_OLLAMA,
        ),
    ),
    lambda v: OutputOptions(
        out=v["out"], name=v.get("name"), force=v["force"], ollama_version=v["ollama_version"]
    ),
)

PROFILES = OptionGroup(
    "profiles",
    (
        Flag(
            "profile",
            _opt(
                list[str],
                "--profile",
                help="Quantization profile (see `edge-export profiles`). Repeat for several.",
            ),
            ["Q4_K_M"],
        ),
        Flag(
            "profile_file",
            _opt(
                list[Path],
                "--profile-file",
                help="Extra profile definitions (TOML, same schema as quant_profiles/).",
            ),
            [],
        ),
    ),
    lambda v: ProfileOptions(names=tuple(v["profile"]), files=tuple(v["profile_file"])),
)

RUN = OptionGroup(
    "run",
    (
        Flag(
            "cache",
            _opt(bool, "--cache/--no-cache", help="Reuse and keep finished stages in the stage cache."),
            True,
        ),
        Flag(
            "rehash",
            _opt(
                bool,
                "--rehash",
                help="Read every input and cached file to verify it, instead of trusting files whose inode, size and "
                "modification time are unchanged since they were hashed.",
            ),
            False,
        ),
        Flag(
            "no_wait",
            _opt(
                bool,
                "--no-wait",
                help="Fail at once if another run holds --out or a cache entry, instead of waiting.",
            ),
            False,
        ),
        Flag(
            "lock_timeout",
            _opt(
                float | None,
                "--lock-timeout",
                min=0,
                help="Wait at most this many seconds for another run's locks.",
            ),
            None,
        ),
        Flag(
            "max_memory",
            _opt(
                str | None,
                "--max-memory",
                help="Memory budget, e.g. 4GB: stay under it (a bfloat16 reference if need be) or stop before any work.",
            ),
            None,
        ),
        Flag(
            "threads",
            _opt(
                int | None,
                "--threads",
                min=1,
                help="Threads per quantization and evaluation (default: all cores).",
            ),
            None,
        ),
        Flag(
            "jobs", _opt(int, "--jobs", min=1, help="Profiles quantized at once, each in its own process."), 1
        ),
    ),
    lambda v: RunOptions(
        use_cache=v.get("cache", True),
        rehash=v.get("rehash", False),
        lock=LockPolicy(wait=not v.get("no_wait", False), timeout=v.get("lock_timeout")),
        max_memory=parse_size(v["max_memory"]) if v.get("max_memory") else None,
        threads=v.get("threads"),
        jobs=v.get("jobs", 1),
    ),
)

QUALITY = OptionGroup(
    "quality",
    (
        Flag(
            "eval_data",
            _opt(
                Path | None,
                "--eval-data",
                help='Evaluation text (.txt) or chat JSONL ({"messages": [...]}); default: built-in set.',
            ),
            None,
        ),
        Flag(
            "reference_dtype",
            _opt(
                str | None,
                "--reference-dtype",
                help="dtype of the unmerged PyTorch reference: float32 (default) or bfloat16 "
                "(chosen automatically when --max-memory needs it and this is not given).",
            ),
            None,
        ),
        Flag(
            "reference_device",
            _opt(
                str,
                "--reference-device",
                help="Device of the PyTorch reference: cpu, or mps on Apple silicon.",
            ),
            "cpu",
        ),
        Flag(
            "gate",
            _opt(
                list[str],
                "--gate",
                help="Override a quality gate: KEY=VALUE or PROFILE:KEY=VALUE "
                "(max_mean_kld, min_top1, max_ln_ppl_ratio, min_greedy_match, min_adapter_effect_kept).",
            ),
            [],
        ),
        Flag(
            "device",
            _opt(
                str,
                "--device",
                help="Where GGUFs are evaluated: cpu, or metal where llama-cpp-python has it.",
            ),
            "cpu",
        ),
    ),
    lambda v: QualityOptions(
        eval_data=v["eval_data"],
        reference_dtype=v["reference_dtype"] or "float32",
        device=v["reference_device"],
        gates=tuple(v["gate"]),
        threads=v.get("threads"),
        gguf_device=v["device"],
        reference_dtype_fixed=v["reference_dtype"] is not None,
    ),
)

QLORA = OptionGroup(
    "qlora",
    (
        Flag(
            "trained_on",
            _opt(
                str | None,
                "--trained-on",
                help="The adapter is a QLoRA adapter trained on a bitsandbytes 4-bit base: nf4 or fp4 "
                "(detected from a base's quantization_config or the adapter's model card when they say it).",
            ),
            None,
        ),
        Flag(
            "double_quant",
            _opt(
                bool | None,
                "--double-quant/--no-double-quant",
                help="With --trained-on: the 4-bit base used double quantization (bitsandbytes' default: no).",
            ),
            None,
        ),
        Flag(
            "quant_block_size",
            _opt(int | None, "--quant-block-size", help="With --trained-on: 4-bit block size (default 64)."),
            None,
        ),
        Flag(
            "quant_compute_dtype",
            _opt(
                str | None,
                "--quant-compute-dtype",
                help="With --trained-on: the 4-bit layers' compute dtype (float32, float16, bfloat16; default float32).",
            ),
            None,
        ),
        Flag(
            "merge_base",
            _opt(
                str | None,
                "--merge-base",
                help="QLoRA: merge onto w16 (the 16-bit base), dequant (the base rounded to 4 bits and back, as "
                "trained), or auto (default: both, keep the one with the lower loss on the evaluation data).",
            ),
            None,
        ),
        Flag(
            "dequantize_base",
            _opt(
                bool,
                "--dequantize-base",
                help="--base is a bitsandbytes 4-bit model with no 16-bit weights: merge onto its dequantized "
                "weights (those the adapter was trained on). The 16-bit base it was made from is better.",
            ),
            False,
        ),
    ),
    lambda v: QloraOptions(
        trained_on=v["trained_on"],
        double_quant=v["double_quant"],
        block_size=v["quant_block_size"],
        compute_dtype=v["quant_compute_dtype"],
        merge_base=v["merge_base"],
        dequantize_base=v["dequantize_base"],
    ),
)

CHECK_FLAG = _opt(bool, "--check/--no-check", help="Check every GGUF against the unmerged reference.")
DTYPE_FLAG = _opt(
    str | None,
    "--dtype",
    help="dtype of the merged model: float16, bfloat16 or float32 (default: the base's).",
)
CALIBRATION_TOKENS_DEFAULT = DEFAULT_CALIBRATION_TOKENS
