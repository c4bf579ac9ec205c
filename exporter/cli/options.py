"""The command line's option groups, declared once: every command takes the same flags the same way.

Each group's flags build one typed, validated options object of exporter.inputs.options; a command names
the groups it takes with `@with_options` (exporter/cli/option_groups.py).
"""

from __future__ import annotations

from pathlib import Path

from exporter.cli.option_groups import Flag, OptionGroup, option, parse_size
from exporter.core.locks import LockPolicy
from exporter.inputs.adapter import parse_adapter_argument
from exporter.inputs.ollama_version import CURRENT_OLLAMA
from exporter.inputs.options import (
    InputOptions,
    OutputOptions,
    ProfileOptions,
    QloraOptions,
    QualityOptions,
    RunOptions,
)
from exporter.inputs.vision import DEFAULT_MMPROJ_TYPE

INPUTS = OptionGroup(
    "inputs",
    (
        Flag(
            "adapter",
            option(
                list[str],
                "--adapter",
                help="PEFT adapter folder; DIR:WEIGHT adds it with a weight. Repeat for several.",
            ),
        ),
        Flag(
            "base",
            option(
                str | None,
                "--base",
                help="Base model folder or Hugging Face id (local cache only). "
                "Default: base_model_name_or_path from adapter_config.json.",
            ),
            None,
        ),
        Flag(
            "allow_pickle",
            option(
                bool,
                "--allow-pickle",
                help="Accept a pickle adapter_model.bin (loaded with weights_only=True).",
            ),
            False,
        ),
        Flag(
            "trust_remote_code",
            option(
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
        Flag("out", option(Path, "--out", help="Output folder (GGUFs, Modelfiles, manifest.json, reports).")),
        Flag("name", option(str | None, "--name", help="Model name used in file names."), None),
        Flag("force", option(bool, "--force", help="Replace an earlier export in --out."), False),
        Flag(
            "ollama_version",
            option(
                str,
                "--ollama-version",
                help=f"The Ollama release the Modelfiles are for (default {CURRENT_OLLAMA}); 0.30+ renders "
                "the GGUF's own template, older ones only the Modelfile's TEMPLATE.",
            ),
            CURRENT_OLLAMA,
        ),
        Flag(
            "mmproj_type",
            option(
                str,
                "--mmproj-type",
                help="A vision-language model's projector GGUF (<name>-mmproj-<TYPE>.gguf): F16 (exact) or Q8_0.",
            ),
            DEFAULT_MMPROJ_TYPE,
        ),
    ),
    lambda v: OutputOptions(
        out=v["out"],
        name=v.get("name"),
        force=v["force"],
        ollama_version=v["ollama_version"],
        mmproj_type=v.get("mmproj_type", DEFAULT_MMPROJ_TYPE),
    ),
)

PROFILES = OptionGroup(
    "profiles",
    (
        Flag(
            "profile",
            option(
                list[str],
                "--profile",
                help="Quantization profile (see `edge-export profiles`). Repeat for several. Default: Q4_K_M, "
                "or every profile of the --profile-file files when they are given.",
            ),
            [],
        ),
        Flag(
            "profile_file",
            option(
                list[Path],
                "--profile-file",
                help="Extra profile definitions (TOML, same schema as quant_profiles/).",
            ),
            [],
        ),
    ),
    lambda v: ProfileOptions(
        names=tuple(v["profile"] or ([] if v["profile_file"] else ["Q4_K_M"])), files=tuple(v["profile_file"])
    ),
)

RUN = OptionGroup(
    "run",
    (
        Flag(
            "cache",
            option(bool, "--cache/--no-cache", help="Reuse and keep finished stages in the stage cache."),
            True,
        ),
        Flag(
            "rehash",
            option(
                bool,
                "--rehash",
                help="Read every input and cached file to verify it, instead of trusting files whose inode, size and "
                "modification time are unchanged since they were hashed.",
            ),
            False,
        ),
        Flag(
            "no_wait",
            option(
                bool,
                "--no-wait",
                help="Fail at once if another run holds --out or a cache entry, instead of waiting.",
            ),
            False,
        ),
        Flag(
            "lock_timeout",
            option(
                float | None,
                "--lock-timeout",
                min=0,
                help="Wait at most this many seconds for another run's locks.",
            ),
            None,
        ),
        Flag(
            "max_memory",
            option(
                str | None,
                "--max-memory",
                help="Memory budget, e.g. 4GB: stay under it (a bfloat16 reference if need be) or stop before any work.",
            ),
            None,
        ),
        Flag(
            "max_disk",
            option(
                str | None,
                "--max-disk",
                help="Disk budget, e.g. 40GB: stop before any work when the export's planned peak (merged "
                "model, 16-bit GGUF, quantized files, cache included) is larger.",
            ),
            None,
        ),
        Flag(
            "threads",
            option(
                int | None,
                "--threads",
                min=1,
                help="Threads per quantization and evaluation (default: all cores).",
            ),
            None,
        ),
        Flag(
            "jobs",
            option(int, "--jobs", min=1, help="Profiles quantized at once, each in its own process."),
            1,
        ),
    ),
    lambda v: RunOptions(
        use_cache=v.get("cache", True),
        rehash=v.get("rehash", False),
        lock=LockPolicy(wait=not v.get("no_wait", False), timeout=v.get("lock_timeout")),
        max_memory=parse_size(v["max_memory"]) if v.get("max_memory") else None,
        max_disk=parse_size(v["max_disk"]) if v.get("max_disk") else None,
        threads=v.get("threads"),
        jobs=v.get("jobs", 1),
    ),
)

QUALITY = OptionGroup(
    "quality",
    (
        Flag(
            "eval_data",
            option(
                Path | None,
                "--eval-data",
                help='Evaluation text (.txt) or chat JSONL ({"messages": [...]}); default: built-in set.',
            ),
            None,
        ),
        Flag(
            "eval_tokens",
            option(
                str,
                "--eval-tokens",
                help="Tokens of the evaluation data scored: a number, all, or auto (every token up to 1.5B "
                "weights; above, fewer in proportion, at least 512: every k-th window, spread over the set).",
            ),
            "auto",
        ),
        Flag(
            "context",
            option(
                int | None,
                "--context",
                min=1,
                help="Context length (tokens) at which each report row gives the memory to run the GGUF "
                "(weights + llama.cpp's KV cache); default the model's trained context, capped at 8192.",
            ),
            None,
        ),
        Flag(
            "reference_dtype",
            option(
                str | None,
                "--reference-dtype",
                help="dtype of the unmerged PyTorch reference: float32 (default) or bfloat16 "
                "(chosen automatically when --max-memory needs it and this is not given).",
            ),
            None,
        ),
        Flag(
            "reference_device",
            option(
                str,
                "--reference-device",
                help="Device of the PyTorch reference: cpu, or mps on Apple silicon.",
            ),
            "cpu",
        ),
        Flag(
            "gate",
            option(
                list[str],
                "--gate",
                help="Override a quality gate: KEY=VALUE or PROFILE:KEY=VALUE "
                "(max_mean_kld, min_top1, max_ln_ppl_ratio, min_greedy_match, min_adapter_effect_kept).",
            ),
            [],
        ),
        Flag(
            "device",
            option(
                str,
                "--device",
                help="Where GGUFs are evaluated: cpu, or metal where llama-cpp-python has it.",
            ),
            "cpu",
        ),
    ),
    lambda v: QualityOptions(
        eval_data=v["eval_data"],
        eval_tokens=v["eval_tokens"],
        reference_dtype=v["reference_dtype"] or "float32",
        device=v["reference_device"],
        gates=tuple(v["gate"]),
        threads=v.get("threads"),
        gguf_device=v["device"],
        reference_dtype_fixed=v["reference_dtype"] is not None,
        context=v["context"],
    ),
)

QLORA = OptionGroup(
    "qlora",
    (
        Flag(
            "trained_on",
            option(
                str | None,
                "--trained-on",
                help="The adapter is a QLoRA adapter trained on a bitsandbytes 4-bit base: nf4 or fp4 "
                "(detected from a base's quantization_config or the adapter's model card when they say it).",
            ),
            None,
        ),
        Flag(
            "double_quant",
            option(
                bool | None,
                "--double-quant/--no-double-quant",
                help="With --trained-on: the 4-bit base used double quantization (bitsandbytes' default: no).",
            ),
            None,
        ),
        Flag(
            "quant_block_size",
            option(
                int | None, "--quant-block-size", help="With --trained-on: 4-bit block size (default 64)."
            ),
            None,
        ),
        Flag(
            "quant_compute_dtype",
            option(
                str | None,
                "--quant-compute-dtype",
                help="With --trained-on: the 4-bit layers' compute dtype (float32, float16, bfloat16; default float32).",
            ),
            None,
        ),
        Flag(
            "merge_base",
            option(
                str | None,
                "--merge-base",
                help="QLoRA: merge onto w16 (the 16-bit base), dequant (the base rounded to 4 bits and back, as "
                "trained), or auto (default: both, keep the one with the lower loss on the evaluation data).",
            ),
            None,
        ),
        Flag(
            "dequantize_base",
            option(
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

CHECK_FLAG = option(bool, "--check/--no-check", help="Check every GGUF against the unmerged reference.")
DTYPE_FLAG = option(
    str | None,
    "--dtype",
    help="dtype of the merged model: float16, bfloat16 or float32 (default: the base's).",
)
CALIBRATION_FLAG = option(
    Path | None,
    "--calibration",
    help="Text (.txt) or JSONL chats from the adapter's domain: compute an importance matrix on the "
    "merged model and quantize every profile with it (needed by IQ4_XS, IQ3_M).",
)
CALIBRATION_TOKENS_FLAG = option(
    int, "--calibration-tokens", min=256, help="Most calibration tokens to read."
)
IMATRIX_FLAG = option(
    Path | None,
    "--imatrix",
    help="An importance matrix computed earlier (an earlier run's <name>.imatrix.gguf, or llama-imatrix's "
    "GGUF output) to quantize with, instead of --calibration.",
)
KEEP_MERGED_FLAG = option(
    bool,
    "--keep-merged",
    help="Keep the merged model's weights in <out>/merged (and the stage cache) once the 16-bit GGUF is "
    "written; by default they are released then, since the GGUF holds them.",
)
