"""Inputs saved by transformers {4.57, 5.23} × PEFT {0.18, 0.21}, each exported through merge-quantize.

Every base, adapter and tokenizer here is written by the real release it stands for, in its own
environment (tests/sideenv.py, tests/matrix_writer.py), together with the unmerged model's log-probs
computed there. The export must reproduce that model: the F16 GGUF within mean KLD 1e-4 of it, Q8_0
within its profile's gate, and the merged folder must load as the same model in both transformers majors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEMO_EVAL, REPO, DemoInputs, run_cli
from tests.sideenv import SideEnv, cache_dir, side_env

CELLS = [("4.57.6", "0.18.1"), ("4.57.6", "0.21.2"), ("5.23.0", "0.18.1"), ("5.23.0", "0.21.2")]
TRAIN = REPO / "exporter" / "data" / "demo_train.jsonl"
WRITER = REPO / "tests" / "matrix_writer.py"
READER = REPO / "tests" / "matrix_reader.py"


@dataclass(frozen=True)
class Written:
    env: SideEnv
    root: Path  # base/, adapter/, reference.npz, eval.json

    @property
    def evaluation(self) -> dict:
        return json.loads((self.root / "eval.json").read_text())


def _digest(*files: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


@pytest.fixture(scope="module", params=CELLS, ids=[f"transformers-{t}+peft-{p}" for t, p in CELLS])
def written(request: pytest.FixtureRequest, demo_inputs: DemoInputs) -> Written:
    """The writer's output for one cell, built once and cached by its recipe."""
    transformers, peft = request.param
    env = side_env(transformers, peft)
    tokenizer, template = demo_inputs.base / "tokenizer.json", demo_inputs.base / "chat_template.jinja"
    key = _digest(
        WRITER,
        REPO / "tests" / "tiny.py",
        REPO / "converters" / "metrics.py",
        tokenizer,
        template,
        TRAIN,
        DEMO_EVAL,
    )
    target = cache_dir() / "matrix" / f"transformers-{transformers}-peft-{peft}-{key}"
    if not (target / "eval.json").is_file():
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        env.run(
            str(WRITER),
            str(staging),
            str(tokenizer),
            str(template),
            str(TRAIN),
            str(DEMO_EVAL),
            extra_path=(REPO,),
        )
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return Written(env, target)


def test_the_inputs_are_in_the_dialect_of_their_writer(written: Written):
    """Guards the matrix itself: each cell's files really carry its releases' spellings."""
    versions = written.evaluation["versions"]
    assert (versions["transformers"], versions["peft"]) == (written.env.transformers, written.env.peft)
    config = json.loads((written.root / "base" / "config.json").read_text())
    tokenizer_config = json.loads((written.root / "adapter" / "tokenizer_config.json").read_text())
    adapter_config = json.loads((written.root / "adapter" / "adapter_config.json").read_text())
    if written.env.transformers.startswith("5."):
        assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 100000.0
        assert tokenizer_config["tokenizer_class"] == "TokenizersBackend"
        assert isinstance(tokenizer_config["extra_special_tokens"], list)
    else:
        assert config["rope_theta"] == 100000.0 and "rope_parameters" not in config
        assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert ("kasa_config" in adapter_config) == written.env.peft.startswith("0.21")
    assert written.evaluation["base_mean_kld"] > 0.05  # the adapter visibly moves the model


def test_export_reproduces_the_model_its_writer_trained(written: Written, tmp_path: Path):
    from converters.llama_runtime import score_gguf
    from converters.metrics import summarize
    from quant_profiles import builtin_profiles

    out = tmp_path / "export"
    adapter = written.root / "adapter"
    proc = run_cli(
        "merge-quantize", "--adapter", str(adapter), "--base", str(written.root / "base"), "--name", "cell",
        "--profile", "Q8_0", "--out", str(out), "--eval-data", str(DEMO_EVAL), "--keep-merged",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr  # nothing in these inputs is ignored
    report = json.loads((out / "report.json").read_text())
    assert report["passed"], report["artifacts"]

    # Against the unmerged model as computed by the releases that wrote the files.
    sequences = written.evaluation["sequences"]
    reference = np.load(written.root / "reference.npz")
    gate = builtin_profiles().get("Q8_0").gates.max_mean_kld
    for profile, limit in (("F16", 1e-4), ("Q8_0", gate)):
        scores = tmp_path / f"{profile}.npz"
        score_gguf(out / f"cell-{profile}.gguf", sequences, written.root / "reference.npz", scores)
        rows = np.load(scores)
        metrics = summarize(rows["kld"], rows["same_top"], rows["nll"], reference["nll"])
        assert metrics["mean_kld"] <= limit, (profile, metrics)

    # The merged folder is the same model to both transformers majors.
    merged = out / "merged"
    readings = [
        json.loads(env.run(str(READER), str(merged), str(written.root), extra_path=(REPO,)).splitlines()[-1])
        for env in (side_env("4.57.6", written.env.peft), side_env("5.23.0", written.env.peft))
    ]
    for reading in readings:
        assert reading["theta"] == pytest.approx(100000.0, rel=1e-4), reading
        assert reading["mean_kld"] <= 1e-4, reading
        assert reading["chat_template"], reading
    assert readings[0]["ids"] == readings[1]["ids"]
