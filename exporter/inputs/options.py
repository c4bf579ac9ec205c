"""What a command was asked to do: frozen option groups, validated where they are made.

Every command is built from the same groups (the CLI declares each group's flags once, in
exporter/cli/options.py): the inputs (adapters and base), the output folder, the profiles, how the
run behaves (cache, locks, memory, threads) and how quality is checked. A value that makes no sense
is refused here, before any work, with the flag that carries it named in the message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from exporter.core.errors import InputError
from exporter.core.locks import LockPolicy
from exporter.inputs.evaldata import check_eval_tokens
from exporter.inputs.ollama_version import CURRENT_OLLAMA, OllamaTarget, ollama_target
from exporter.inputs.safetensors_header import DEFAULT_SHARD_BYTES
from exporter.inputs.vision import DEFAULT_MMPROJ_TYPE, mmproj_type

DEFAULT_CALIBRATION_TOKENS = 65536  # most calibration tokens read for an importance matrix
REFERENCE_DTYPES = ("float32", "bfloat16")
REFERENCE_DEVICES = ("cpu", "mps")
GGUF_DEVICES = ("cpu", "metal")
GATE_KEYS = {
    "max_mean_kld": "mean_kld",
    "min_top1": "top1",
    "max_ln_ppl_ratio": "ln_ppl_ratio",
    "min_greedy_match": "greedy_match",
    "min_adapter_effect_kept": "adapter_effect_kept",
}
GateOverrides = dict[tuple[str | None, str], float]
QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit types (QLoRA)
MERGE_BASES = ("w16", "dequant", "auto")


@dataclass(frozen=True)
class InputOptions:
    """The adapters (each with the weight of its delta) and the base they are merged into."""

    adapters: tuple[tuple[Path, float], ...]
    base: str | None = None  # a folder or a Hugging Face id; None: the adapter's base_model_name_or_path
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.adapters:
            raise InputError("No --adapter given. Name at least one PEFT adapter folder.")


@dataclass(frozen=True)
class OutputOptions:
    """Where the results go and what they are called."""

    out: Path
    name: str | None = None
    force: bool = False
    ollama_version: str = CURRENT_OLLAMA  # the Ollama release the Modelfiles are written for
    mmproj_type: str = DEFAULT_MMPROJ_TYPE  # a vision-language model's projector: F16 or Q8_0

    def __post_init__(self) -> None:
        ollama_target(self.ollama_version)  # refuses a malformed version early
        object.__setattr__(self, "mmproj_type", mmproj_type(self.mmproj_type))

    @property
    def ollama(self) -> OllamaTarget:
        return ollama_target(self.ollama_version)


@dataclass(frozen=True)
class ProfileOptions:
    """The quantization profiles asked for, and extra profile files to read them from."""

    names: tuple[str, ...] = ("Q4_K_M",)
    files: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        for file in self.files:
            if not file.is_file():
                raise InputError(
                    f"The profile file {file} does not exist. Pass a TOML file with the schema of quant_profiles/."
                )


@dataclass(frozen=True)
class RunOptions:
    """How a run behaves: the stage cache, locks, the memory budget and threads."""

    use_cache: bool = True
    rehash: bool = False  # verify cached stages and hash inputs by reading every byte
    lock: LockPolicy = field(default_factory=LockPolicy)
    max_memory: int | None = None  # bytes; None = no budget
    max_disk: int | None = None  # bytes the run may add to a file system at its peak; None: the free space
    threads: int | None = None
    jobs: int = 1  # profiles quantized at once

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise InputError(f"--jobs {self.jobs}: pass 1 or more.")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads {self.threads}: pass 1 or more, or leave it out for all cores.")


@dataclass(frozen=True)
class QualityOptions:
    """How artifacts are checked against the unmerged reference."""

    eval_data: Path | None = None
    reference_dtype: str = "float32"
    device: str = "cpu"
    gates: tuple[str, ...] = ()
    n_prompts: int = 6
    max_new_tokens: int = 24
    # scored tokens: a number, "all", or "auto" (exporter.inputs.evaldata.token_budget)
    eval_tokens: str = "auto"
    threads: int | None = None
    gguf_device: str = "cpu"  # or "metal", where llama-cpp-python was built with it
    trust_remote_code: bool = False  # run the base's own modelling code (config.json auto_map)
    reference_dtype_fixed: bool = True  # False: --max-memory may switch the reference to bfloat16
    context: int | None = None  # the context each report row's memory is given at (None: trained, ≤ 8k)

    def __post_init__(self) -> None:
        check_eval_tokens(self.eval_tokens)
        if self.reference_dtype not in REFERENCE_DTYPES:
            raise InputError(
                f"--reference-dtype {self.reference_dtype!r} is not supported; use float32 or bfloat16."
            )
        if self.device not in REFERENCE_DEVICES:
            raise InputError(f"--reference-device {self.device!r} is not supported; use cpu or mps.")
        if self.gguf_device not in GGUF_DEVICES:
            raise InputError(f"--device {self.gguf_device!r} is not supported; use cpu or metal.")
        if self.eval_data is not None and not self.eval_data.is_file():
            raise InputError(
                f"The evaluation data {self.eval_data} does not exist. Pass a .txt file or a chat JSONL file "
                "to --eval-data, or leave it out for the built-in set."
            )
        parse_gate_overrides(self.gates)

    @property
    def gate_overrides(self) -> GateOverrides:
        return parse_gate_overrides(self.gates)


def parse_gate_overrides(values: tuple[str, ...]) -> GateOverrides:
    """`--gate max_mean_kld=0.3` (every profile) or `--gate Q4_K_M:max_mean_kld=0.3` (one profile)."""
    overrides: GateOverrides = {}
    for value in values:
        target, sep, number = value.partition("=")
        profile, _, key = target.rpartition(":")
        if not sep or key not in GATE_KEYS:
            raise InputError(
                f"--gate {value!r} is not KEY=VALUE or PROFILE:KEY=VALUE with KEY one of {', '.join(GATE_KEYS)}."
            )
        try:
            overrides[(profile.upper() or None, key)] = float(number)
        except ValueError as exc:
            raise InputError(f"--gate {value!r}: {number!r} is not a number.") from exc
    return overrides


@dataclass(frozen=True)
class ExportingOptions:
    """What every command that writes GGUFs takes: inputs, output, profiles, run, quality."""

    inputs: InputOptions
    output: OutputOptions
    profiles: ProfileOptions = field(default_factory=ProfileOptions)
    run: RunOptions = field(default_factory=RunOptions)
    quality: QualityOptions = field(default_factory=QualityOptions)
    check: bool = True


@dataclass(frozen=True)
class QloraOptions:
    """What a QLoRA adapter was trained on (when the inputs do not say it) and which merge base to keep."""

    trained_on: str | None = None  # nf4 | fp4; None: detected from the inputs, or not a QLoRA adapter
    double_quant: bool | None = None  # None: as detected, else bitsandbytes' default
    block_size: int | None = None
    compute_dtype: str | None = None
    merge_base: str | None = None  # w16 | dequant | auto; None: auto for a QLoRA adapter
    dequantize_base: bool = False  # a 4-bit-only base: merge onto its dequantized weights

    def __post_init__(self) -> None:
        if self.trained_on is not None and self.trained_on not in QUANT_TYPES:
            raise InputError(f"--trained-on {self.trained_on!r}: use nf4 or fp4 (bitsandbytes' 4-bit types).")
        if self.merge_base is not None and self.merge_base not in MERGE_BASES:
            raise InputError(f"--merge-base {self.merge_base!r}: use w16, dequant or auto.")


DEFAULT_FIT_TRIALS = 120


@dataclass(frozen=True)
class FitOptions:
    """--fit SIZE or --fit-bpw BITS: one more GGUF, the mix of types the search finds best within the budget."""

    text: str  # the budget as given, which names the fitted profile
    budget_bytes: int | None = None
    bits_per_weight: float | None = None
    max_trials: int = DEFAULT_FIT_TRIALS

    def __post_init__(self) -> None:
        if (self.budget_bytes is None) == (self.bits_per_weight is None):
            raise InputError("Give --fit SIZE or --fit-bpw BITS, not both.")
        if self.bits_per_weight is not None and not 1.0 <= self.bits_per_weight < 16.0:
            raise InputError(
                f"--fit-bpw {self.bits_per_weight}: give the bits per weight of the file, between 1 and 16 "
                "(16 is the F16 file itself)."
            )
        if self.max_trials < 2:
            raise InputError(f"--fit-trials {self.max_trials}: the search needs at least 2 trials.")

    @property
    def flag(self) -> str:
        """The option as given, for messages: `--fit 2.5GB`, `--fit-bpw 4.3`."""
        return f"--fit-bpw {self.text}" if self.bits_per_weight is not None else f"--fit {self.text}"

    @property
    def label(self) -> str:
        """The fitted profile's name: FIT-2.5GB, FIT-4.3bpw."""
        unit = "bpw" if self.bits_per_weight is not None else ""
        return "FIT-" + re.sub(r"[^A-Za-z0-9_.-]", "", self.text) + unit

    def budget_for(self, n_params: int) -> int:
        """The budget in bytes for a model of `n_params` weights (--fit-bpw: bits per weight of the file)."""
        if self.budget_bytes is not None:
            return self.budget_bytes
        assert self.bits_per_weight is not None
        return int(self.bits_per_weight * n_params / 8)


@dataclass(frozen=True)
class ExportOptions(ExportingOptions):
    """`edge-export merge-quantize`: merge, convert, quantize, check."""

    dtype: str | None = None  # of the merged model; None: the base's (float16 where it fits)
    calibration: Path | None = None
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS
    imatrix: Path | None = None  # an importance-matrix GGUF to use instead of computing one
    qlora: QloraOptions = field(default_factory=QloraOptions)
    keep_merged: bool = False  # keep the merged weights once the 16-bit GGUF holds them
    fit: FitOptions | None = None  # --fit / --fit-bpw

    def __post_init__(self) -> None:
        if self.calibration is not None and self.imatrix is not None:
            raise InputError(
                f"Both --calibration {self.calibration} and --imatrix {self.imatrix} were given. Pass "
                "--calibration to compute the importance matrix, or --imatrix to use one computed earlier, not both."
            )
        if self.calibration is not None and not self.calibration.is_file():
            raise InputError(
                f"The calibration data {self.calibration} does not exist. Pass a .txt or .jsonl file to "
                "--calibration."
            )
        if self.imatrix is not None and not self.imatrix.is_file():
            raise InputError(
                f"The importance matrix {self.imatrix} does not exist. Pass an imatrix GGUF to --imatrix "
                "(the <name>.imatrix.gguf of an earlier run, or llama-imatrix's output)."
            )

    @property
    def has_imatrix(self) -> bool:
        """An importance matrix is computed (--calibration) or given (--imatrix)."""
        return self.calibration is not None or self.imatrix is not None


@dataclass(frozen=True)
class RuntimeLoraOptions(ExportingOptions):
    """`edge-export runtime-lora`: one quantized base per profile, each adapter as a GGUF LoRA on it."""

    compare_merged: bool = False  # also merge-then-quantize each adapter and report both


@dataclass(frozen=True)
class MergeOptions:
    """`edge-export merge`: the merged Hugging Face folder alone."""

    inputs: InputOptions
    output: OutputOptions
    run: RunOptions = field(default_factory=RunOptions)
    dtype: str | None = None
    max_shard_bytes: int = DEFAULT_SHARD_BYTES


@dataclass(frozen=True)
class CheckOptions:
    """`edge-export check`: score an export again, against gates and an optional baseline."""

    manifest: Path
    run: RunOptions = field(default_factory=RunOptions)
    quality: QualityOptions = field(default_factory=QualityOptions)
    baseline: Path | None = None
    junit: Path | None = None
    kld_tolerance: float = 0.10  # relative growth of mean KLD allowed against the baseline
    top1_tolerance: float = 0.005  # absolute drop of top-1 agreement allowed against the baseline

    def __post_init__(self) -> None:
        if self.baseline is not None and not self.baseline.is_file():
            raise InputError(
                f"The baseline {self.baseline} does not exist. Pass the report.json of an earlier export or check."
            )


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class BatchOptions:
    """`edge-export batch`: every export of a plan file, as one stage graph run by an executor."""

    plan: Path
    run: RunOptions = field(default_factory=RunOptions)
    executor: str = "local"
    ray_address: str = "auto"  # "auto": the cluster `ray start` began on this machine
    cores: int | None = None  # heavy stages at once on the local executor; None: every core
    force: bool = False
    out: Path | None = None  # instead of the plan's out

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise InputError(f"--executor {self.executor!r} is not known; use local or ray.")
        if self.cores is not None and self.cores < 1:
            raise InputError(f"--cores {self.cores}: pass 1 or more, or leave it out for every core.")
        if self.executor == "ray" and not self.run.use_cache:
            raise InputError(
                "--no-cache cannot be used with --executor ray: the stage cache, on storage every node sees, is "
                "how stages on different nodes hand each other their files. Drop --no-cache."
            )
