"""`edge-export merge` on the real SmolLM2 demo adapter, against PEFT's merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import DemoInputs, run_cli


def test_merge_command_matches_peft_on_the_demo_model(demo_inputs: DemoInputs, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    proc = run_cli(
        "merge",
        "--adapter",
        str(demo_inputs.adapter),
        "--base",
        str(demo_inputs.base),
        "--out",
        str(out),
        "--max-shard-size",
        "100MB",
    )
    assert proc.returncode == 0, proc.stderr
    assert "merged 210 of 272 tensors" in proc.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3  # 257 MiB in shards of at most 100 MiB
    ours: dict[str, torch.Tensor] = {}
    for shard in shards:
        assert (out / shard).stat().st_size <= 100 * 2**20 + 64 * 1024
        ours.update(load_file(str(out / shard)))

    model = AutoModelForCausalLM.from_pretrained(demo_inputs.base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, demo_inputs.adapter).merge_and_unload()
    expected = {k: v.to(torch.float16) for k, v in merged.state_dict().items()}
    assert set(ours) == set(expected) - {"lm_head.weight"}  # tied: stored once
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor.float(), expected[name].float(), rtol=2e-3, atol=2e-4, msg=name)
    base = load_file(str(demo_inputs.base / "model.safetensors"))
    moved = [n for n in ours if not torch.equal(ours[n], base[n])]
    assert len(moved) == 210 and all(n.endswith("_proj.weight") for n in moved)

    provenance = json.loads((out / "edge-export-merge.json").read_text())
    assert provenance["adapters"][0]["files"]["adapter_model.safetensors"]
    assert len(provenance["merged_tensors"]) == 210


def test_merge_command_refuses_a_non_empty_output(demo_inputs: DemoInputs, tmp_path: Path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("merge", "--adapter", str(demo_inputs.adapter), "--out", str(out))
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
