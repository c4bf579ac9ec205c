"""mlx-lm adapters (adapters.safetensors, A as (in, r), B as (r, out), `scale`), trained by the real mlx-lm
0.32.2 on mlx's CPU backend: merged exactly, checked against mlx-lm's own unmerged model and through the
real pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import DEMO_EVAL, DemoInputs, run_cli
from tests.mlx_fixture import MlxRun, mlx_adapter
from tests.tiny import make_tiny_smollm

LORA = {
    "fine_tune_type": "lora",
    "num_layers": 8,
    "iters": 8,
    "learning_rate": 2e-4,
    "mask_prompt": True,
    "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
}
DORA = {
    "fine_tune_type": "dora",
    "num_layers": -1,
    "iters": 4,
    "lora_parameters": {
        "rank": 4,
        "scale": 10.0,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"],
    },
}


def _hf_logits(model_dir: Path, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _closeness(ours: np.ndarray, run: MlxRun) -> float:
    """The largest logit difference from mlx-lm's, relative to the logits' spread."""
    return float(np.abs(ours - run.logits).max() / run.logits.std())


def test_an_mlx_lora_exports_as_mlx_runs_it(demo_inputs: DemoInputs, tmp_path: Path):
    from exporter.inputs.adapter import read_adapter

    run = mlx_adapter(demo_inputs.base, LORA)
    assert {p.name for p in run.adapter.iterdir()} >= {"adapters.safetensors", "adapter_config.json"}
    # The reference edge-export scores against (PEFT with the translated adapter) is mlx-lm's model.
    translated = read_adapter(run.adapter).path
    assert _closeness(_hf_logits(demo_inputs.base, run.ids, translated), run) < 1e-4
    out = tmp_path / "out"
    proc = run_cli(
        "merge-quantize", "--adapter", str(run.adapter), "--base", str(demo_inputs.base), "--name", "mlx",
        "--profile", "Q8_0", "--out", str(out), "--eval-data", str(DEMO_EVAL),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stdout = " ".join(proc.stdout.split())
    assert "a greedy chat reply stopped at <|im_end|>" in stdout, stdout
    assert "rope_theta" not in stdout  # trained with the base's rope: no note
    report = json.loads((out / "report.json").read_text())
    rows = {row["label"]: row["metrics"] for row in report["artifacts"]}
    assert rows["F16"]["mean_kld"] <= 1e-4, rows["F16"]
    assert report["base_floor"]["metrics"]["mean_kld"] > 1e-3  # the adapter moved the model
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["adapters"][0]["path"] == str(run.adapter.resolve())
    assert (out / "mlx-Q8_0.Modelfile").is_file()


def test_an_mlx_dora_on_chosen_layers_merges_exactly(demo_inputs: DemoInputs, tmp_path: Path):
    base = make_tiny_smollm(tmp_path / "base", demo_inputs.base)
    run = mlx_adapter(base, DORA)
    out = tmp_path / "merged"
    proc = run_cli(
        "merge", "--adapter", str(run.adapter), "--base", str(base), "--out", str(out), "--dtype", "float32"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _closeness(_hf_logits(out, run.ids), run) < 1e-4
    assert _closeness(_hf_logits(base, run.ids), run) > 1e-2  # and the adapter matters


def test_mlx_inputs_that_cannot_be_merged_are_refused(demo_inputs: DemoInputs, tmp_path: Path):
    run = mlx_adapter(demo_inputs.base, LORA)
    cases: dict[str, tuple[dict[str, Any] | None, str]] = {
        "full": ({"fine_tune_type": "full"}, "fine_tune_type 'full'"),
        "rank": ({"lora_parameters": {"rank": 4, "scale": 20.0}}, "do not have the rank 4"),
        "quantized": ({"model": str(tmp_path / "q4")}, "quantized to 4 bits"),
        "no-config": (None, "holds adapters.safetensors but no adapter_config.json"),
    }
    (tmp_path / "q4").mkdir()
    (tmp_path / "q4" / "config.json").write_text(json.dumps({"quantization": {"bits": 4, "group_size": 64}}))
    for name, (change, message) in cases.items():
        adapter = shutil.copytree(run.adapter, tmp_path / name)
        config = json.loads((adapter / "adapter_config.json").read_text())
        if change is None:
            (adapter / "adapter_config.json").unlink()
        else:
            (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
        proc = run_cli(
            "merge-quantize", "--adapter", str(adapter), "--base", str(demo_inputs.base),
            "--out", str(tmp_path / f"out-{name}"), "--no-check",
        )  # fmt: skip
        text = " ".join(proc.stderr.split())
        assert proc.returncode == 2 and message in text, (name, text)
        assert not (tmp_path / f"out-{name}").exists()


@pytest.mark.parametrize("theta_in_trained_config", [True, False])
def test_a_transformers5_rope_misread_by_mlx_is_noted(theta_in_trained_config: bool, tmp_path: Path):
    from exporter.inputs.mlx_adapter import rope_note

    base_config = {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
    trained = tmp_path / "trained"
    trained.mkdir()
    extra = {"rope_theta": 100000.0} if theta_in_trained_config else {}
    (trained / "config.json").write_text(json.dumps({**base_config, **extra}))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"model": str(trained)}))
    note = rope_note(tmp_path, base_config)
    assert (note is None) == theta_in_trained_config
    if note:
        assert "trained with rope_theta 10000" in note and "100000.0" in note
