"""Adapters as trainers write them, through the real pipeline: a TRL 1.16 SFTTrainer output folder (final
adapter beside its checkpoints, training_args.bin, a template with {% generation %} markers), a torchtune
0.6.1 epoch folder, a LLaMA-Factory 0.9.5 output folder (mlx-lm: test_mlx_adapters.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DEMO_EVAL, DemoInputs, run_cli
from tests.trainer_fixture import llamafactory_run, torchtune_run
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


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, demo_inputs: DemoInputs) -> Path:
    from tests.tiny import make_tiny_smollm

    return make_tiny_smollm(tmp_path_factory.mktemp("trainers") / "base", demo_inputs.base)


def _f16_export(adapter: Path, base: Path, out: Path) -> tuple[str, dict[str, Any]]:
    proc = run_cli(
        "merge-quantize", "--adapter", str(adapter), "--base", str(base), "--name", "tuned", "--profile", "F16",
        "--out", str(out), "--eval-tokens", "256",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {row["label"]: row["metrics"] for row in report["artifacts"]}
    assert rows["F16"]["mean_kld"] <= 1e-4, rows["F16"]
    assert report["base_floor"]["metrics"]["mean_kld"] > 1e-3  # the training moved the model
    return " ".join(proc.stdout.split()), report


def test_a_torchtune_epoch_folder_merges_as_torchtune_merged_it(tiny_base: Path, tmp_path: Path):
    from safetensors.torch import load_file

    epoch = torchtune_run(tiny_base) / "epoch_0"
    config = json.loads((epoch / "adapter_config.json").read_text())
    assert set(config) == {"r", "lora_alpha", "target_modules", "peft_type"}  # torchtune's minimal config
    out = tmp_path / "merged"
    proc = run_cli(
        "merge", "--adapter", str(epoch), "--base", str(tiny_base), "--out", str(out), "--dtype", "float32"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ours = load_file(out / "model.safetensors")
    theirs = load_file(epoch / "model-00001-of-00001.safetensors")  # torchtune's own merge (fp32)
    assert set(theirs) <= set(ours)
    changed = [n for n in theirs if "proj" in n]
    assert changed and max(float((ours[n] - theirs[n]).abs().max()) for n in changed) < 1e-5
    _f16_export(epoch, tiny_base, tmp_path / "out")

    for folder, message in (
        (epoch, "holds adapter_config.json beside a model, so it is not a plain base"),
        (
            _without(epoch, tmp_path / "native", "adapter_model.safetensors"),
            "torchtune's own checkpoint format",
        ),
    ):
        args = ["--adapter", str(folder), "--base", str(tiny_base)] if folder != epoch else ["--adapter",
                str(epoch), "--base", str(epoch)]  # fmt: skip
        proc = run_cli(
            "merge-quantize", *args, "--out", str(tmp_path / f"refused-{folder.name}"), "--no-check"
        )
        assert proc.returncode == 2 and message in " ".join(proc.stderr.split()), proc.stderr
        assert not (tmp_path / f"refused-{folder.name}").exists()


def _without(folder: Path, target: Path, name: str) -> Path:
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns(name, "model-*", "*.index.json"))
    return target


def test_a_llamafactory_output_exports_with_the_template_it_saved(tiny_base: Path, tmp_path: Path):
    run = llamafactory_run(tiny_base)
    assert json.loads((run / "adapter_config.json").read_text())["peft_version"] == "0.18.1"
    assert "Human: " in (run / "chat_template.jinja").read_text()  # LLaMA-Factory's `default`, not ChatML
    stdout, _ = _f16_export(run, tiny_base, tmp_path / "out")
    assert "tokenizer parity: HF and llama.cpp agree" in stdout, stdout
    modelfile = (tmp_path / "out" / "tuned-F16.Modelfile").read_text()
    assert "Human: " in modelfile and "Assistant:" in modelfile
