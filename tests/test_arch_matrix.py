"""The architecture matrix: for each architecture, a tiny real-layout base and a trained LoRA (tests/arch_matrix.py)
go through the real CLI and must reproduce PEFT's unmerged model.

merge-quantize: the F16 GGUF within mean KLD 1e-4 of the unmerged model, the adapter's effect visible (the
base alone far from it), Q8_0 within its gate, a Modelfile written, and the coverage ledger complete (every
expert of every MoE layer merged). runtime-lora: the F16 base with the GGUF LoRA within 1e-4 as well, or
refused (exit 2) with a pointer to merge-quantize where llama.cpp cannot apply the adapter at run time.

Each test records its row in the results file (tests/arch_matrix.py's results_file()); `python -m
tests.arch_matrix_table` renders it as the README's table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.arch_matrix import ARCHITECTURES, Architecture, Built, build, record_result
from tests.conftest import DEMO_EVAL, REPO, DemoInputs, run_cli

TRAIN = REPO / "exporter" / "data" / "demo_train.jsonl"
EVAL_CHATS = 3


def _ids(architecture: Architecture) -> str:
    return architecture.slug


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few of the demo's held-out chats: enough tokens to tell 1e-4 from a wrong merge, quick to score."""
    lines = [line for line in DEMO_EVAL.read_text().splitlines() if line.strip()][:EVAL_CHATS]
    path = tmp_path_factory.mktemp("arch-eval") / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _built(architecture: Architecture, demo_inputs: DemoInputs) -> Built:
    return build(architecture, demo_inputs.base, TRAIN)


def _artifact(report: dict[str, Any], label: str) -> dict[str, Any]:
    return next(a for a in report["artifacts"] if a["label"] == label)


def _expert_tensors(built: Built) -> set[str]:
    """Every stored expert tensor of every layer that the adapter's target_parameters train."""
    from exporter.inputs.fused_experts import fused_layouts

    config = json.loads((built.base / "config.json").read_text())
    layout = fused_layouts()[config["model_type"]]
    experts = config.get("num_experts") or config.get("num_local_experts")
    names = set()
    for layer in range(config["num_hidden_layers"]):
        for stored in layout.stored.values():
            for template in stored:
                for expert in range(experts):
                    names.add(f"model.layers.{layer}.{template.format(expert=expert)}")
    return names


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=_ids)
def test_merge_quantize_reproduces_the_unmerged_model(
    architecture: Architecture, demo_inputs: DemoInputs, eval_data: Path, tmp_path: Path
) -> None:
    built = _built(architecture, demo_inputs)
    out = tmp_path / "export"
    proc = run_cli(
        "merge-quantize", "--adapter", str(built.adapter), "--base", str(built.base), "--name", architecture.export,
        "--profile", "Q8_0", "--out", str(out), "--eval-data", str(eval_data),
        *(f"--gate={gate}" for gate in architecture.gates),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    f16, q8, floor = _artifact(report, "F16"), _artifact(report, "Q8_0"), report["base_floor"]["metrics"]

    # The adapter visibly moves the model, and the merged F16 GGUF is the unmerged model.
    assert floor["mean_kld"] > 0.1, floor
    assert f16["metrics"]["mean_kld"] <= architecture.f16_max_kld, f16["metrics"]
    assert f16["metrics"]["adapter_effect_kept"] > 0.99, f16["metrics"]
    assert q8["passed"], q8["gates"]
    assert report["passed"]

    # The ledger: every targeted tensor merged, every adapter tensor placed, printed and kept.
    coverage = manifest["merge"]["coverage"]
    targeted = coverage["targeted_tensors"]
    assert targeted > 0 and coverage["merged_tensors"] == targeted, coverage
    assert f"merged {targeted} of {targeted} targeted tensors" in proc.stdout
    adapter = coverage["adapters"][0]
    assert adapter["merged_tensors"] + len(adapter["skipped"]) == adapter["tensors"], adapter
    if architecture.moe:
        merged = set(json.loads((out / "merged" / "edge-export-merge.json").read_text())["merged_tensors"])
        missing = _expert_tensors(built) - merged
        assert not missing, f"{len(missing)} expert tensors not merged, e.g. {sorted(missing)[:3]}"

    modelfile = out / f"{architecture.export}-Q8_0.Modelfile"
    assert modelfile.is_file()
    record_result(
        architecture,
        "merge",
        {
            "f16_mean_kld": f16["metrics"]["mean_kld"],
            "q8_0_mean_kld": q8["metrics"]["mean_kld"],
            "base_mean_kld": floor["mean_kld"],
            "coverage": coverage["summary"],
            "modelfile": manifest["modelfiles"][0]["chat_template_family"],
        },
    )


# runtime-lora runs in make test where the rows differ in how llama.cpp applies a LoRA at run time: fused
# qkv/gate_up (Phi-3), fused experts made per-expert LoRA (Qwen3-MoE; Mixtral under other stored names;
# Qwen2-MoE with a shared expert) and the refusal (gpt-oss). The plain attention + MLP rows, whose path the
# demo's runtime-LoRA tests take, run in make test-all (each costs ~27 s of converter start-up).
RUNTIME_IN_MAKE_TEST = {"Phi-3", "Qwen3-MoE", "Qwen2-MoE", "Mixtral", "gpt-oss"}


@pytest.mark.parametrize(
    "architecture",
    [
        a if a.name in RUNTIME_IN_MAKE_TEST else pytest.param(a, marks=pytest.mark.slow, id=a.slug)
        for a in ARCHITECTURES
    ],
    ids=_ids,
)
def test_runtime_lora_applies_the_adapter_or_points_to_merge_quantize(
    architecture: Architecture, demo_inputs: DemoInputs, eval_data: Path, tmp_path: Path
) -> None:
    built = _built(architecture, demo_inputs)
    out = tmp_path / "runtime"
    proc = run_cli(
        "runtime-lora", "--adapter", str(built.adapter), "--base", str(built.base), "--name", architecture.export,
        "--profile", "F16", "--out", str(out), "--eval-data", str(eval_data),
    )  # fmt: skip
    if architecture.name == "gpt-oss":
        # gpt-oss stores its experts fused (3-D) and transposed: llama.cpp's LoRA converter cannot take them.
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "merge-quantize" in proc.stderr and "fused experts" in proc.stderr, proc.stderr
        assert not out.exists() or not any(out.glob("*.gguf"))
        record_result(architecture, "runtime", {"supported": False, "why": "fused 3-D experts"})
        return
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The runtime ledger: the GGUF LoRA carries every targeted tensor (each expert of a stacked pair).
    coverage = json.loads((out / "manifest.json").read_text())["adapters"][0]["coverage"]
    assert coverage["carried_tensors"] == coverage["targeted_tensors"] > 0, coverage
    if architecture.moe:
        assert coverage["targeted_tensors"] > len(_expert_tensors(built)), coverage
    assert coverage["summary"] in proc.stdout
    report = json.loads((out / "report.json").read_text())
    pair = report["pairs"][0]
    metrics = pair["runtime"]["metrics"]
    assert metrics["mean_kld"] <= 1e-4, metrics
    assert report["base_floor"][pair["adapter"]]["mean_kld"] > 0.1
    record_result(
        architecture,
        "runtime",
        {"supported": True, "f16_mean_kld": metrics["mean_kld"], "coverage": coverage["summary"]},
    )


def test_a_phi_3_name_llama_cpp_cannot_load(demo_inputs: DemoInputs, tmp_path: Path) -> None:
    """llama.cpp looks up </s>, <unk> and <s> in the vocabulary of any GGUF whose name contains "phi-3" or
    "phi3", and cannot load one without them: such a name is refused before any work."""
    built = _built(next(a for a in ARCHITECTURES if a.name == "Phi-3"), demo_inputs)
    for command in ("merge-quantize", "runtime-lora"):
        proc = run_cli(
            command, "--adapter", str(built.adapter), "--base", str(built.base), "--name", "my-Phi3-pirate",
            "--profile", "Q8_0", "--out", str(tmp_path / command), "--no-check",
        )  # fmt: skip
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        message = " ".join(proc.stderr.split())
        assert "contains 'phi3'" in message and "has no </s>, <unk>, <s>" in message and "--name" in message
        assert not (tmp_path / command).exists()


@pytest.fixture(scope="module")
def per_expert(demo_inputs: DemoInputs) -> Path:
    """A tiny Qwen3-MoE and a LoRA on its experts one by one, written by transformers 4.57 + PEFT 0.21
    (tests/per_expert_writer.py), cached by recipe."""
    import hashlib
    import shutil

    from tests.sideenv import cache_dir, side_env

    writer = REPO / "tests" / "per_expert_writer.py"
    tokenizer, template = demo_inputs.base / "tokenizer.json", demo_inputs.base / "chat_template.jinja"
    files = (writer, tokenizer, template, TRAIN)
    key = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    target = cache_dir() / "arch-matrix" / f"qwen3-moe-per-expert-t4-{key}"
    if not (target / "written.json").is_file():
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        side_env("4.57.6", "0.21.2").run(str(writer), str(staging), str(tokenizer), str(template), str(TRAIN))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def test_per_expert_lora_of_transformers_4_merges_into_every_expert(
    per_expert: Path, eval_data: Path, tmp_path: Path
) -> None:
    """An adapter trained when experts were nn.Linear layers (transformers 4, "all-linear": every expert and
    the router) merges into the base's per-expert tensors and matches the unmerged model, which transformers
    5 and PEFT 0.21 build from the same adapter."""
    from safetensors import safe_open

    with safe_open(str(per_expert / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(".mlp.experts.3.down_proj.lora_A" in name for name in f.keys())  # noqa: SIM118
    out = tmp_path / "export"
    proc = run_cli(
        "merge-quantize", "--adapter", str(per_expert / "adapter"), "--base", str(per_expert / "base"),
        "--name", "qwen3-moe-t4", "--profile", "Q8_0", "--out", str(out), "--eval-data", str(eval_data),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    f16 = _artifact(report, "F16")["metrics"]
    assert report["base_floor"]["metrics"]["mean_kld"] > 0.1
    assert f16["mean_kld"] <= 1e-4 and f16["adapter_effect_kept"] > 0.99, f16
    assert report["passed"]
    coverage = json.loads((out / "manifest.json").read_text())["merge"]["coverage"]
    # 2 layers: q/k/v/o, the router, and gate/up/down of each of 4 experts
    assert coverage["summary"] == "merged 34 of 34 targeted tensors", coverage
    merged = set(json.loads((out / "merged" / "edge-export-merge.json").read_text())["merged_tensors"])
    experts = {
        f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
        for layer in range(2)
        for expert in range(4)
        for proj in ("gate_proj", "up_proj", "down_proj")
    }
    assert experts <= merged, sorted(experts - merged)[:3]
