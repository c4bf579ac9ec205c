"""The catalog of bad inputs, each through the real command line (merge-quantize, and runtime-lora where
its entry says so): exit code 2, one paragraph naming the file and the fix, no traceback, and nothing
left behind in the output folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from exporter.core.locks import LockPolicy, hold_lock, output_lock_path
from tests.conftest import REPO, DemoInputs
from tests.tiny import copy_tokenizer, make_adapter, make_tiny_llama

# Where the catalog writes what each case printed (docs/reliability.md is made from it).
MESSAGES_ENV = "EDGE_EXPORT_CATALOG_MESSAGES"


@dataclass(frozen=True)
class Inputs:
    root: Path
    base: Path  # tiny Llama with the demo's tokenizer files
    bare_base: Path  # tiny Llama without tokenizer files
    adapter: Path
    other_vocab_adapter: Path  # embedding LoRA trained on a 320-token vocabulary
    demo: DemoInputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, demo_inputs: DemoInputs) -> Inputs:
    root = tmp_path_factory.mktemp("catalog")
    bare = make_tiny_llama(root / "bare-base")
    base = make_tiny_llama(root / "base")
    copy_tokenizer(demo_inputs.base, base)
    adapter = make_adapter(base, root / "adapter")
    wide = make_tiny_llama(root / "wide-base", vocab=320)
    other = make_adapter(wide, root / "wide-adapter", target_modules=["embed_tokens", "q_proj"])
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/wide-model-not-on-this-machine"
    (other / "adapter_config.json").write_text(json.dumps(config))
    return Inputs(root, base, bare, adapter, other, demo_inputs)


def copy_folder(source: Path, target: Path) -> Path:
    """A copy whose large weights are symlinks (the catalog edits only small files)."""
    target.mkdir()
    for entry in source.iterdir():
        if entry.suffix == ".safetensors" and entry.stat().st_size > 1 << 20:
            (target / entry.name).symlink_to(entry.resolve())
        else:
            shutil.copyfile(entry, target / entry.name)
    return target


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@dataclass(frozen=True)
class Case:
    """One catalog entry: prepare(inputs, tmp) returns the CLI arguments of `command` (without --out);
    with `held`, the test holds the output folder's lock (as another run would) while it runs."""

    entry: str
    prepare: Callable[[Inputs, Path], list[str]]
    fragments: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    out: Callable[[Path], Path] = lambda tmp: tmp / "out"
    command: str = "merge-quantize"
    held: bool = False


def tiny_args(inputs: Inputs, adapter: Path | None = None, base: Path | None = None) -> list[str]:
    return ["--adapter", str(adapter or inputs.adapter), "--base", str(base or inputs.base), "--no-check"]


def missing_config(inputs: Inputs, tmp: Path) -> list[str]:
    adapter = shutil.copytree(inputs.adapter, tmp / "adapter")
    (adapter / "adapter_config.json").unlink()
    return tiny_args(inputs, adapter)


def shape_mismatch(inputs: Inputs, tmp: Path) -> list[str]:
    other = make_tiny_llama(tmp / "other", hidden=32)
    copy_tokenizer(inputs.base, other)
    adapter = shutil.copytree(inputs.adapter, tmp / "adapter")
    edit_json(adapter / "adapter_config.json", base_model_name_or_path="org/model-not-on-this-machine")
    return tiny_args(inputs, adapter, other)


def vocab_mismatch(inputs: Inputs, tmp: Path) -> list[str]:
    return tiny_args(inputs, inputs.other_vocab_adapter)


def unknown_peft_type(inputs: Inputs, tmp: Path) -> list[str]:
    adapter = shutil.copytree(inputs.adapter, tmp / "adapter")
    edit_json(adapter / "adapter_config.json", peft_type="VERA_PLUS")
    return tiny_args(inputs, adapter)


def truncated_base(inputs: Inputs, tmp: Path) -> list[str]:
    base = shutil.copytree(inputs.base, tmp / "base")
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return tiny_args(inputs, base=base)


def corrupt_adapter(inputs: Inputs, tmp: Path) -> list[str]:
    adapter = shutil.copytree(inputs.adapter, tmp / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    return tiny_args(inputs, adapter)


def pickle_adapter(inputs: Inputs, tmp: Path) -> list[str]:
    adapter = shutil.copytree(inputs.adapter, tmp / "adapter")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    return tiny_args(inputs, adapter)


def no_tokenizer(inputs: Inputs, tmp: Path) -> list[str]:
    return tiny_args(inputs, base=inputs.bare_base)


def unsupported_architecture(inputs: Inputs, tmp: Path) -> list[str]:
    base = shutil.copytree(inputs.base, tmp / "exotic-base")
    edit_json(base / "config.json", architectures=["ExoticForCausalLM"])
    return tiny_args(inputs, base=base)


def unknown_pre_tokenizer(inputs: Inputs, tmp: Path) -> list[str]:
    base = copy_folder(inputs.demo.base, tmp / "base")
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    # Another pre-tokenizer (split digits one by one): the converter's hash of its output is unknown.
    tokenizer["pre_tokenizer"] = {"type": "Digits", "individual_digits": True}
    (base / "tokenizer.json").write_text(json.dumps(tokenizer))
    return ["--adapter", str(inputs.demo.adapter), "--base", str(base), "--no-check", "--no-cache"]


def unknown_profile(inputs: Inputs, tmp: Path) -> list[str]:
    return [*tiny_args(inputs), "--profile", "Q4_K_XL"]


def imatrix_profile(inputs: Inputs, tmp: Path) -> list[str]:
    return [*tiny_args(inputs), "--profile", "IQ4_XS"]


def existing_output(inputs: Inputs, tmp: Path) -> list[str]:
    return tiny_args(inputs)


def zero_rank(inputs: Inputs, tmp: Path) -> list[str]:
    adapter = shutil.copytree(inputs.adapter, tmp / "adapter")
    edit_json(adapter / "adapter_config.json", r=0)
    return tiny_args(inputs, adapter)


def block_count_not_fitting(inputs: Inputs, tmp: Path) -> list[str]:
    from peft.tuners.lora.config import BdLoraConfig

    bd = BdLoraConfig(
        target_modules_bd_a=["q_proj"], target_modules_bd_b=["o_proj"], nblocks=2, match_strict=False
    )
    adapter = make_adapter(inputs.base, tmp / "bd-adapter", fill_lora=True, use_bdlora=bd)
    config = json.loads((adapter / "adapter_config.json").read_text())
    edit_json(adapter / "adapter_config.json", use_bdlora={**config["use_bdlora"], "nblocks": 3})
    return tiny_args(inputs, adapter)


def small_disk_budget(inputs: Inputs, tmp: Path) -> list[str]:
    return [*tiny_args(inputs), "--keep-merged", "--max-disk", "100KB"]


def nan_weights(inputs: Inputs, tmp: Path) -> list[str]:
    from safetensors.torch import load_file, save_file

    adapter = shutil.copytree(inputs.adapter, tmp / "adapter")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return tiny_args(inputs, adapter)


def empty_eval_data(inputs: Inputs, tmp: Path) -> list[str]:
    (tmp / "eval.txt").write_text("\n")
    return [
        "--adapter",
        str(inputs.adapter),
        "--base",
        str(inputs.base),
        "--eval-data",
        str(tmp / "eval.txt"),
    ]


def triple_quote_in_modelfile(inputs: Inputs, tmp: Path) -> list[str]:
    base = copy_folder(inputs.demo.base, tmp / "base")
    (base / "LICENSE").write_text('Licensed under the """Example""" license.\n')
    return ["--adapter", str(inputs.demo.adapter), "--base", str(base), "--no-check", "--no-cache"]


def custom_code(inputs: Inputs, tmp: Path) -> list[str]:
    base = shutil.copytree(inputs.base, tmp / "custom-base")
    edit_json(base / "config.json", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    return tiny_args(inputs, base=base)


def refused_adapter_key(inputs: Inputs, tmp: Path) -> list[str]:
    adapter = shutil.copytree(inputs.adapter, tmp / "adapter")
    edit_json(adapter / "adapter_config.json", use_qalora=True)
    return tiny_args(inputs, adapter)


def unknown_adapter_key(inputs: Inputs, tmp: Path) -> list[str]:
    adapter = shutil.copytree(inputs.adapter, tmp / "adapter")
    edit_json(adapter / "adapter_config.json", lora_future_config={"mode": "sparse"})
    return tiny_args(inputs, adapter)


def base_rewriting_init(inputs: Inputs, tmp: Path) -> list[str]:
    adapter = shutil.copytree(inputs.adapter, tmp / "adapter")
    edit_json(adapter / "adapter_config.json", init_lora_weights="pissa_niter_4")
    return tiny_args(inputs, adapter)


def kasa_with_another(inputs: Inputs, tmp: Path) -> list[str]:
    from peft import KasaConfig

    kasa = make_adapter(inputs.base, tmp / "kasa", kasa_config=KasaConfig())
    return [*tiny_args(inputs, kasa), "--adapter", str(inputs.adapter)]


def overflowing_bf16_base(inputs: Inputs, tmp: Path) -> Path:
    from safetensors.torch import load_file, save_file

    base = make_tiny_llama(tmp / "bf16-base", dtype=torch.bfloat16)
    copy_tokenizer(inputs.base, base)
    weights = load_file(str(base / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e5
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


def float16_of_overflowing_bf16(inputs: Inputs, tmp: Path) -> list[str]:
    return [*tiny_args(inputs, base=overflowing_bf16_base(inputs, tmp)), "--dtype", "float16"]


def f16_profile_of_overflowing_bf16(inputs: Inputs, tmp: Path) -> list[str]:
    return [*tiny_args(inputs, base=overflowing_bf16_base(inputs, tmp)), "--profile", "F16"]


def base_config_not_json(inputs: Inputs, tmp: Path) -> list[str]:
    base = shutil.copytree(inputs.base, tmp / "base")
    (base / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    return tiny_args(inputs, base=base)


def held_output(inputs: Inputs, tmp: Path) -> list[str]:
    return [*tiny_args(inputs), "--no-wait"]


def phi_3_name(inputs: Inputs, tmp: Path) -> list[str]:
    return [*tiny_args(inputs), "--name", "phi3-pirate"]


def torchtune_native_adapter(inputs: Inputs, tmp: Path) -> list[str]:
    adapter = shutil.copytree(inputs.adapter, tmp / "epoch_0")
    # torchtune's own adapter checkpoint (a torch.save pickle), which is never opened
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.pt")
    return tiny_args(inputs, adapter)


def base_holding_an_adapter(inputs: Inputs, tmp: Path) -> list[str]:
    base = shutil.copytree(inputs.base, tmp / "epoch_0")  # torchtune: merged model and adapter side by side
    shutil.copyfile(inputs.adapter / "adapter_config.json", base / "adapter_config.json")
    return tiny_args(inputs, base=base)


def mlx_full_fine_tune(inputs: Inputs, tmp: Path) -> list[str]:
    from safetensors.torch import save_file

    adapter = tmp / "mlx-adapters"
    adapter.mkdir()
    save_file({"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 128)}, adapter / "adapters.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full", "num_layers": 1}))
    return tiny_args(inputs, adapter)


def dora_magnitudes_without_use_dora(inputs: Inputs, tmp: Path) -> list[str]:
    adapter = make_adapter(inputs.base, tmp / "dora-adapter", fill_lora=True, use_dora=True)
    edit_json(adapter / "adapter_config.json", use_dora=False)
    return tiny_args(inputs, adapter)


CASES = [
    Case(
        "torchtune's native adapter checkpoint (.pt)",
        torchtune_native_adapter,
        ("adapter_model.pt, torchtune's own checkpoint format", "tune_to_peft_adapter_weights"),
    ),
    Case(
        "base folder holding an adapter (a torchtune epoch folder)",
        base_holding_an_adapter,
        ("holds adapter_config.json beside a model", "--adapter"),
    ),
    Case(
        "mlx-lm full fine-tune given as an adapter",
        mlx_full_fine_tune,
        ("fine_tune_type 'full'", "mlx_lm fuse --dequantize"),
    ),
    Case(
        "DoRA magnitudes in a config without use_dora (torchtune)",
        dora_magnitudes_without_use_dora,
        ("lora_magnitude_vector, but adapter_config.json does not set use_dora", '"use_dora": true'),
    ),
    Case(
        "missing adapter_config.json", missing_config, ("adapter_config.json is missing", "Point --adapter")
    ),
    Case("adapter for another base (shapes)", shape_mismatch, ("adapter_model.safetensors", "--base")),
    Case(
        "adapter for another base (vocabulary size)", vocab_mismatch, ("embed_tokens", "vocabulary", "--base")
    ),
    Case("unknown or unmergeable PEFT type", unknown_peft_type, ("VERA_PLUS", "adapter_config.json")),
    Case(
        "truncated base safetensors",
        truncated_base,
        ("model.safetensors", "truncated or corrupt", "Re-download"),
    ),
    Case(
        "corrupt adapter safetensors", corrupt_adapter, ("adapter_model.safetensors", "truncated or corrupt")
    ),
    Case("pickle adapter without --allow-pickle", pickle_adapter, ("adapter_model.bin", "--allow-pickle")),
    Case("base without tokenizer files", no_tokenizer, ("no tokenizer files", "tokenizer.json", "Copy")),
    Case(
        "architecture this llama.cpp does not support",
        unsupported_architecture,
        ("ExoticForCausalLM", "config.json", "not supported by llama.cpp 0c1e57098"),
    ),
    Case("unknown BPE pre-tokenizer", unknown_pre_tokenizer, ("BPE pre-tokenizer", "llama.cpp 0c1e57098")),
    Case(
        "export name llama.cpp cannot load with this vocabulary",
        phi_3_name,
        ("contains 'phi3'", "has no </s>, <unk>, <s>", "--name"),
    ),
    Case("unknown profile name", unknown_profile, ("unknown profile 'Q4_K_XL'", "edge-export profiles")),
    Case(
        "profile that needs an importance matrix, without calibration data",
        imatrix_profile,
        ("IQ4_XS needs an importance matrix", "Q4_K_M"),
    ),
    Case(
        "output folder that is not writable",
        existing_output,
        ("is not writable", "Choose another"),
        out=lambda tmp: Path("/proc/edge-export-catalog/out"),  # writable by nobody, root included
    ),
    Case(
        "too little free disk for the planned outputs",
        existing_output,
        ("Not enough free disk space", "needs about", "F16 GGUF", "only 1000.0 KiB is free"),
        env={"EDGE_EXPORT_FREE_DISK_BYTES": str(1000 * 1024)},
    ),
    Case(
        "planned disk peak over --max-disk",
        small_disk_budget,
        (
            "needs about",
            "at its peak",
            "merged model",
            "more than --max-disk 100.0 KiB",
            "pass --no-check without --keep-merged",
        ),
    ),
    Case(
        "adapter config with r = 0",
        zero_rank,
        ("adapter_config.json sets r = 0", "whole number of at least 1"),
    ),
    Case(
        "BD-LoRA whose nblocks does not fit the saved factors",
        block_count_not_fitting,
        ("use_bdlora.nblocks = 3", "bd-adapter/adapter_config.json", "another nblocks or r"),
    ),
    Case("NaN/Inf in merged weights", nan_weights, ("NaN or Inf", "adapter_model.safetensors")),
    Case("empty evaluation data", empty_eval_data, ("eval.txt", "fewer than 16 tokens", "more text")),
    Case(
        'Modelfile content containing """',
        triple_quote_in_modelfile,
        ("license text", "cannot hold", "export again"),
    ),
    Case(
        "adapter setting the merge does not compute (QA-LoRA)",
        refused_adapter_key,
        ("adapter_config.json sets use_qalora = True. QA-LoRA feeds A", "Train without use_qalora"),
    ),
    Case(
        "adapter setting edge-export does not know",
        unknown_adapter_key,
        ("lora_future_config", "does not know", "may change the adapter's weights"),
    ),
    Case(
        "adapter initialised by rewriting the base (PiSSA)",
        base_rewriting_init,
        (
            "init_lora_weights = 'pissa_niter_4', which the merge cannot",
            "path_initial_model_for_weight_conversion",
        ),
    ),
    Case("KaSA adapter merged with another adapter", kasa_with_another, ("KaSA", "Export it on its own")),
    Case(
        "--dtype float16 on a bfloat16 base beyond float16's range",
        float16_of_overflowing_bf16,
        ("model.layers.0.mlp.down_proj.weight", "beyond float16's range", "--dtype bfloat16"),
    ),
    Case(
        "F16 profile from a bfloat16 base beyond float16's range",
        f16_profile_of_overflowing_bf16,
        ("beyond float16's range", "F16 would hold Inf", "Ask for BF16"),
    ),
    Case(
        "base config with auto_map, without --trust-remote-code",
        custom_code,
        ("config.json has an auto_map", "--trust-remote-code"),
    ),
    Case(
        "base config.json that is not JSON",
        base_config_not_json,
        ("base/config.json is not valid JSON", "restore the base model's config.json"),
    ),
    Case(
        "output folder another run holds, with --no-wait",
        held_output,
        ("the output folder", "is in use by another edge-export run", "without --no-wait"),
        held=True,
    ),
    Case(
        "runtime-lora: base config.json that is not JSON",
        base_config_not_json,
        ("base/config.json is not valid JSON", "restore the base model's config.json"),
        command="runtime-lora",
    ),
    Case(
        "runtime-lora: profile that needs an importance matrix",
        imatrix_profile,
        ("IQ4_XS needs an importance matrix", "runtime-lora does not compute", "Q4_K_M"),
        command="runtime-lora",
    ),
    Case(
        "runtime-lora: output folder that is not writable",
        existing_output,
        ("is not writable", "Choose another"),
        out=lambda tmp: Path("/proc/edge-export-catalog/out"),
        command="runtime-lora",
    ),
    Case(
        "runtime-lora: output folder another run holds, with --no-wait",
        held_output,
        ("the output folder", "is in use by another edge-export run", "without --no-wait"),
        command="runtime-lora",
        held=True,
    ),
]


def run(
    args: list[str], env: dict[str, str], command: str = "merge-quantize"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", command, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, COLUMNS="200", **env),
    )


@pytest.mark.parametrize("case", CASES, ids=[c.entry for c in CASES])
def test_bad_input_fails_cleanly(case: Case, inputs: Inputs, tmp_path: Path):
    args = case.prepare(inputs, tmp_path)
    out = case.out(tmp_path)
    before = set(tmp_path.iterdir())
    with ExitStack() as held:
        if case.held:  # as another run holds it, until this one has given up
            held.enter_context(hold_lock(output_lock_path(out), f"the output folder {out}", LockPolicy()))
        proc = run([*args, "--out", str(out)], case.env, case.command)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message.startswith("error: "), message
    for fragment in case.fragments:
        assert fragment in message, message
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists(), f"{out} was left behind"
    assert set(tmp_path.iterdir()) == before, "something was left beside the output"
    if os.environ.get(MESSAGES_ENV):
        with open(os.environ[MESSAGES_ENV], "a", encoding="utf-8") as log:
            log.write(json.dumps({"entry": case.entry, "message": message, "code": proc.returncode}) + "\n")


@pytest.mark.parametrize("command", ["merge-quantize", "runtime-lora"])
def test_existing_output_is_refused_without_force_and_kept(inputs: Inputs, tmp_path: Path, command: str):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "base-Q4_K_M.gguf").write_text("an earlier export")  # merge-quantize's model, runtime-lora's base
    proc = run([*tiny_args(inputs), "--name", "base", "--out", str(out)], {}, command)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "already exists" in message and "pass --force" in message, message
    assert (out / "base-Q4_K_M.gguf").read_text() == "an earlier export"
    assert sorted(p.name for p in out.iterdir()) == ["base-Q4_K_M.gguf", "manifest.json"]


def test_debug_shows_the_traceback(inputs: Inputs, tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "exporter", "--debug", "merge-quantize", *no_tokenizer(inputs, tmp_path)]
        + ["--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "InputError" in proc.stderr


@pytest.mark.parametrize(
    ("command", "into"),
    [
        ("merge-quantize", "base"),
        ("merge-quantize", "inside the adapter"),
        ("merge-quantize", "beside the evaluation data"),
        ("runtime-lora", "adapter"),
        ("runtime-lora", "beside the evaluation data"),
        ("merge", "adapter"),
    ],
)
def test_outputs_never_go_into_an_input_folder(inputs: Inputs, tmp_path: Path, command: str, into: str):
    base = copy_folder(inputs.base, tmp_path / "base")
    adapter = shutil.copytree(inputs.adapter, tmp_path / "adapter")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(REPO / "exporter" / "data" / "demo_eval.jsonl", data / "eval.jsonl")
    out = {
        "base": base,
        "adapter": adapter,
        "inside the adapter": adapter / "export",
        "beside the evaluation data": data,
    }[into]
    args = ["--adapter", str(adapter), "--base", str(base), "--out", str(out)]
    if command != "merge":
        args += ["--eval-data", str(data / "eval.jsonl")]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    proc = run([*args, "--force"], {}, command)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "outputs never go" in message and str(out) in message, message
    assert {
        p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")
    } == before  # nothing written, nothing replaced
