"""Real mlx-lm adapters: `python -m mlx_lm lora` (mlx-lm 0.32.2 on mlx's CPU backend) trained a few steps on
a base, built once per recipe and cached outside the checkout, with mlx-lm's own logits of the unmerged
model (base + adapter, float32) on a fixed text, to check the merge against mlx itself.

mlx-lm's Llama reads only a top-level rope_theta, which a config saved by transformers 5 does not have
(rope_parameters): like a careful user, the run trains on a copy of the base whose config.json spells it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.sideenv import trained_run

PROBE_TEXT = "The pirate ship sailed past the lighthouse at dawn, and the crew sang of treasure."


@dataclass(frozen=True)
class MlxRun:
    adapter: Path  # mlx_lm.lora's --adapter-path: adapters.safetensors, adapter_config.json
    model: Path  # the base as mlx-lm loaded it (the base's files, config.json with rope_theta)
    ids: list[int]  # PROBE_TEXT's token ids
    logits: np.ndarray  # mlx-lm's float32 logits of the unmerged model on `ids`, (len(ids), vocab)


def mlx_adapter(base: Path, recipe: dict[str, Any]) -> MlxRun:
    """<cache>/mlx-<key>/: the mlx-lm run of `recipe` (fine_tune_type, num_layers, lora_parameters, iters)."""
    spec = {"mlx-lm": "0.32.2", "mlx": "0.32.4", "text": PROBE_TEXT, **recipe}
    target = trained_run("mlx", base, spec, lambda staging, target: _train(base, staging, target, recipe))
    ids = json.loads((target / "probe.json").read_text())["ids"]
    return MlxRun(target / "adapter", target / "model", ids, np.load(target / "logits.npy"))


def _train(base: Path, staging: Path, target: Path, recipe: dict[str, Any]) -> None:
    from exporter.inputs.dialects import read_rope

    model = staging / "model"
    model.mkdir()
    for item in base.iterdir():
        if item.is_file() and item.name != "config.json":
            shutil.copyfile(item, model / item.name)
    config = json.loads((base / "config.json").read_text())
    config["rope_theta"] = read_rope(config).theta
    (model / "config.json").write_text(json.dumps(config, indent=2))
    data = staging / "data"
    data.mkdir()
    from demos.inputs import read_jsonl

    rows = [json.dumps({"messages": r["messages"]}) for r in read_jsonl("demo_train.jsonl")[:24]]
    (data / "train.jsonl").write_text("\n".join(rows[:20]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(rows[20:]) + "\n")
    settings = {
        "model": str(target / "model"),  # where the model will be once the run is in place
        "train": True,
        "data": str(data),
        "batch_size": 2,
        "learning_rate": 5e-3,
        "steps_per_eval": 1000,
        "val_batches": 1,
        "max_seq_length": 128,
        "seed": 0,
        "adapter_path": str(staging / "adapter"),
        **recipe,
    }
    (staging / "config.yaml").write_text(json.dumps(settings))  # JSON is YAML
    # mlx-lm loads `model` from the path it will have in the cache: point it at the staging copy meanwhile.
    settings["model"] = str(model)
    (staging / "run.yaml").write_text(json.dumps(settings))
    subprocess.run(
        [sys.executable, "-m", "mlx_lm", "lora", "-c", str(staging / "run.yaml")],
        check=True,
        capture_output=True,
        cwd=staging,
    )
    # The adapter's config records the model path it was trained from: the cached copy's.
    adapter_config = json.loads((staging / "adapter" / "adapter_config.json").read_text())
    adapter_config["model"] = str(target / "model")
    (staging / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config, indent=4))
    script = (
        "import json, sys, numpy as np, mlx.core as mx\n"
        "from mlx_lm import load\n"
        "from mlx_lm.tuner.utils import load_adapters\n"
        "model, tokenizer = load(sys.argv[1])\n"
        "model.set_dtype(mx.float32)\n"
        "load_adapters(model, sys.argv[2])\n"
        "model.eval()\n"
        "ids = tokenizer.encode(sys.argv[3])\n"
        "np.save(sys.argv[4], np.array(model(mx.array([ids])))[0])\n"
        "open(sys.argv[5], 'w').write(json.dumps({'ids': ids}))\n"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(model),
            str(staging / "adapter"),
            PROBE_TEXT,
            str(staging / "logits.npy"),
            str(staging / "probe.json"),
        ],
        check=True,
        capture_output=True,
    )
