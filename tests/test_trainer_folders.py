"""Adapters as trainers write them, through the real pipeline: a TRL 1.16 SFTTrainer output folder (final
adapter beside its checkpoints, training_args.bin, a template with {% generation %} markers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import DEMO_EVAL, DemoInputs, run_cli
from tests.trl_fixture import trl_output


@pytest.fixture(scope="module")
def trl_run(demo_inputs: DemoInputs) -> Path:
    return trl_output(demo_inputs.base)


def test_trl_output_folder_exports_as_the_trained_model(
    trl_run: Path, demo_inputs: DemoInputs, tmp_path: Path
):
    assert {"training_args.bin", "checkpoint-2", "checkpoint-4", "adapter_model.safetensors"} <= {
        p.name for p in trl_run.iterdir()
    }
    assert "{% generation %}" in (trl_run / "chat_template.jinja").read_text()
    out = tmp_path / "out"
    proc = run_cli(
        "merge-quantize", "--adapter", str(trl_run), "--base", str(demo_inputs.base), "--name", "trl",
        "--profile", "Q8_0", "--out", str(out), "--eval-data", str(DEMO_EVAL),
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stdout = " ".join(proc.stdout.split())
    # The template's generation markers render in llama.cpp's Jinja engine and in Ollama's translation.
    assert "llama.cpp's Jinja engine: 3 of 3 probe conversations render identically" in stdout, stdout
    assert "renders the Modelfile's TEMPLATE (verified identical)" in stdout, stdout
    assert "a greedy chat reply stopped at <|im_end|>" in stdout, stdout  # ends at end of generation
    assert "tokenizer parity: HF and llama.cpp agree" in stdout, stdout
    report = json.loads((out / "report.json").read_text())
    rows = {row["label"]: row["metrics"] for row in report["artifacts"]}
    assert rows["F16"]["mean_kld"] <= 1e-4, rows["F16"]
    assert report["base_floor"]["metrics"]["mean_kld"] > 0.05  # the four steps moved the model
    # training_args.bin (a pickle of TRL's SFTConfig) is never loaded: TRL is never imported.
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line
    }
    assert "trl" not in imported and "exporter.commands.merge_quantize" in imported


def test_a_checkpoint_is_an_adapter_and_a_folder_of_checkpoints_names_them(
    trl_run: Path, demo_inputs: DemoInputs, tmp_path: Path
):
    out = tmp_path / "merged"
    proc = run_cli(
        "merge",
        "--adapter",
        str(trl_run / "checkpoint-2"),
        "--base",
        str(demo_inputs.base),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ledger = json.loads((out / "edge-export-merge.json").read_text())
    assert str((trl_run / "checkpoint-2").resolve()) in json.dumps(ledger), ledger

    run = tmp_path / "run"  # a run stopped before trainer.save_model: checkpoints only
    run.mkdir()
    for step in (2, 4):
        os.symlink(trl_run / f"checkpoint-{step}", run / f"checkpoint-{step}")
    proc = run_cli(
        "merge-quantize",
        "--adapter",
        str(run),
        "--base",
        str(demo_inputs.base),
        "--out",
        str(tmp_path / "o2"),
    )
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2, message
    assert "holds no final adapter, only the trainer's checkpoints (checkpoint-2, checkpoint-4)" in message
    assert f"--adapter {run / 'checkpoint-4'} (the latest)" in message, message
