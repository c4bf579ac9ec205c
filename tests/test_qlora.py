"""QLoRA adapters: the reference as trained (4-bit base + adapter), both merge candidates, and the merge
base chosen by a paired loss comparison, on a real QLoRA adapter trained with bitsandbytes NF4 on CPU."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import DEMO_EVAL, DemoExport, DemoInputs, copy_export, run_cli, session_output
from tests.qlora_fixture import qlora_fixture

NAME = "pirate-qlora"


@dataclass(frozen=True)
class QloraExport:
    inputs: Path  # the fixture folder: adapter/ and base-4bit/
    base: Path
    eval_data: Path
    out: Path
    stdout: str

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.out / "manifest.json").read_text())

    def args(self, out: Path, *extra: str) -> list[str]:
        # fmt: off
        return ["merge-quantize", "--adapter", str(self.inputs / "adapter"), "--base", str(self.base),
                "--name", NAME, "--profile", "Q8_0", "--out", str(out), "--eval-data", str(self.eval_data),
                *extra]
        # fmt: on


@pytest.fixture(scope="session")
def qlora_inputs(demo_inputs: DemoInputs) -> Path:
    return qlora_fixture(demo_inputs.base)


@pytest.fixture(scope="session")
def qlora_export(
    demo_inputs: DemoInputs, qlora_inputs: Path, tmp_path_factory: pytest.TempPathFactory
) -> QloraExport:
    """merge-quantize on the QLoRA adapter with the 16-bit demo base: NF4 detected from the 4-bit base the
    adapter recorded, --merge-base auto, F16 and Q8_0, on four held-out chats."""
    root = tmp_path_factory.mktemp("qlora")
    eval_data = root / "eval.jsonl"
    eval_data.write_text("".join(DEMO_EVAL.read_text().splitlines(keepends=True)[:4]))
    export = QloraExport(qlora_inputs, demo_inputs.base, eval_data, root / "out", "")
    proc = run_cli(*export.args(export.out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return QloraExport(qlora_inputs, demo_inputs.base, eval_data, session_output(export.out), proc.stdout)


def rows(section: dict[str, Any], candidate: str) -> dict[str, dict[str, Any]]:
    return {r["profile"]: r for r in section["candidates"] if r["candidate"] == candidate}


def test_the_model_as_trained_differs_measurably_from_the_16_bit_reference(qlora_export: QloraExport):
    section = qlora_export.manifest["merge_base"]
    trained = section["trained_on"]
    assert (trained["quant_type"], trained["double_quant"], trained["block_size"]) == ("nf4", True, 64)
    assert trained["source"].endswith("base-4bit/config.json")  # detected from the recorded 4-bit base
    w16 = rows(section, "w16")["F16"]
    # W16 + ΔW in F16 is the 16-bit reference, but far from the model that was trained
    assert w16["kld_16bit"] < 1e-3
    assert w16["kld_as_trained"] > 0.02 and w16["kld_as_trained"] > 20 * w16["kld_16bit"]
    dequant = rows(section, "dequant")["F16"]
    assert dequant["kld_as_trained"] < w16["kld_as_trained"] / 4  # the weights the adapter was trained on


def test_auto_builds_both_candidates_and_keeps_the_lower_loss(qlora_export: QloraExport, tmp_path: Path):
    manifest = qlora_export.manifest
    section = manifest["merge_base"]
    assert section["mode"] == "auto"
    assert {(r["candidate"], r["profile"]) for r in section["candidates"]} == {
        (c, p) for c in ("w16", "dequant") for p in ("F16", "Q8_0")
    }
    losses = {
        c: _recomputed_losses(qlora_export, rows(section, c)["F16"]["sha256"], section, tmp_path)
        for c in ("w16", "dequant")
    }
    diff = losses["dequant"].astype(np.float64) - losses["w16"]
    mean, se = diff.mean(), diff.std(ddof=1) / math.sqrt(len(diff))
    assert section["difference"] == pytest.approx(mean, abs=1e-5)
    assert section["difference_se"] == pytest.approx(se, abs=1e-5)
    for candidate, values in losses.items():
        assert section["loss"][candidate] == pytest.approx(values.mean(), abs=1e-5)
        assert rows(section, candidate)["F16"]["eval_loss"] == pytest.approx(values.mean(), abs=1e-4)
    assert section["chosen"] == ("dequant" if mean < -2 * se else "w16")
    kept = rows(section, section["chosen"])
    lost = rows(section, "w16" if section["chosen"] == "dequant" else "dequant")
    out = qlora_export.out
    # the kept candidate's files are the export's; the other candidate's are nowhere in the output
    for profile in ("F16", "Q8_0"):
        artifact = next(
            a for a in [*manifest["artifacts"], *manifest["intermediates"]] if a["profile"] == profile
        )
        assert artifact["sha256"] == kept[profile]["sha256"] != lost[profile]["sha256"]
    assert sorted(p.name for p in out.glob("*.gguf")) == [f"{NAME}-F16.gguf", f"{NAME}-Q8_0.gguf"]
    assert manifest["options"]["merge_base"] == "auto"


def test_the_report_shows_both_candidates_and_the_choice(qlora_export: QloraExport):
    report = json.loads((qlora_export.out / "report.json").read_text())
    assert report["merge_base"]["chosen"] == qlora_export.manifest["merge_base"]["chosen"]
    markdown = (qlora_export.out / "report.md").read_text()
    assert "## QLoRA: the merge base" in markdown
    assert markdown.count("| W16 + ΔW |") == 2 and markdown.count("| dequant(Q4(W16)) + ΔW |") == 2
    stdout = qlora_export.stdout
    assert "QLoRA merge base" in stdout and "merge base: " in stdout
    assert "second candidate (dequant): dequantize" in stdout and "s in all" in stdout


@pytest.mark.parametrize("forced", ["w16", "dequant"])
def test_merge_base_forced(qlora_export: QloraExport, forced: str, tmp_path: Path):
    out = copy_export(qlora_export.out, tmp_path / "out")
    proc = run_cli(*qlora_export.args(out, "--merge-base", forced, "--force"))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    section = manifest["merge_base"]
    assert (section["mode"], section["chosen"]) == (forced, forced)
    assert {r["candidate"] for r in section["candidates"]} == {forced}
    auto = rows(qlora_export.manifest["merge_base"], forced)
    assert manifest["intermediates"][0]["sha256"] == auto["F16"]["sha256"]
    assert manifest["artifacts"][0]["sha256"] == auto["Q8_0"]["sha256"]
    assert "second candidate" not in proc.stdout


def test_a_plain_lora_is_untouched(demo_export: DemoExport):
    manifest = demo_export.manifest
    assert "merge_base" not in manifest and manifest["options"]["merge_base"] is None
    assert "merge_base" not in demo_export.report
    assert not any(
        stage.startswith(("w16:", "dequant:", "reference:as-trained")) for stage in manifest["stage_seconds"]
    )
    assert "QLoRA" not in demo_export.stdout


def test_a_4_bit_only_base_is_refused(qlora_export: QloraExport, tmp_path: Path):
    """The adapter's recorded base is the 4-bit one: without --base there are no 16-bit weights."""
    args = qlora_export.args(tmp_path / "out")
    without_base = args[: args.index("--base")] + args[args.index("--base") + 2 :]
    proc = run_cli(*without_base)
    assert proc.returncode == 2, proc.stderr + proc.stdout
    message = " ".join(proc.stderr.split())
    assert "base-4bit/config.json describes a quantized model" in message
    assert "--base" in message and "NF4 + double quant" in message
    assert not (tmp_path / "out").exists()


def test_quantization_flags_without_a_qlora_adapter_are_refused(demo_inputs: DemoInputs, tmp_path: Path):
    proc = run_cli("merge-quantize", "--adapter", str(demo_inputs.adapter), "--base", str(demo_inputs.base),
                   "--out", str(tmp_path / "out"), "--merge-base", "dequant")  # fmt: skip
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "pass --trained-on nf4" in " ".join(proc.stderr.split())


def _recomputed_losses(
    export: QloraExport, sha256: str, section: dict[str, Any], scratch: Path
) -> np.ndarray:
    """A candidate's F16 GGUF (found in the stage cache by its sha256) evaluated again by llama.cpp on the
    evaluation tokens: its per-token losses."""
    import os

    from converters.llama_runtime import score_gguf
    from exporter.inputs.evaldata import load_eval_data
    from exporter.inputs.tokenizer import load_tokenizer

    stages = Path(os.environ["EDGE_EXPORT_CACHE_DIR"]) / "stages"
    gguf = next(
        done.parent / "model.gguf"
        for done in stages.glob("convert/*/done.json")
        if json.loads(done.read_text())["files"].get("model.gguf") == sha256
    )
    reference = stages / "reference" / section["references"]["as_trained"]["cache_key"] / "reference.npz"
    eval_data = load_eval_data(export.eval_data, load_tokenizer(export.base))
    output = scratch / f"{sha256[:12]}.npz"
    score_gguf(gguf, eval_data.sequences, reference, output, threads=1)
    with np.load(output) as scores:
        return scores["nll"].astype(np.float64)


def test_a_4_bit_base_unpacks_to_exactly_the_rounded_16_bit_base(qlora_inputs: Path, demo_inputs: DemoInputs,
                                                                  tmp_path: Path):  # fmt: skip
    """bitsandbytes' saved 4-bit blocks, dequantized, are bit for bit dequant(NF4(W16)) of the 16-bit base:
    --dequantize-base merges onto the very weights the adapter was trained on."""
    import torch
    from safetensors.torch import load_file

    from exporter.inputs.trained_on import detect_trained_on
    from exporter.qlora.round_trip import round_trip
    from exporter.qlora.unpack import unpack_four_bit_base

    counts = unpack_four_bit_base(qlora_inputs / "base-4bit", tmp_path / "unpacked")
    assert "quantization_config" not in json.loads((tmp_path / "unpacked" / "config.json").read_text())
    trained_on = detect_trained_on(qlora_inputs / "base-4bit", [])
    assert trained_on is not None
    unpacked = load_file(str(tmp_path / "unpacked" / "model.safetensors"))
    original = load_file(str(demo_inputs.base / "model.safetensors"))
    assert set(unpacked) == set(original) and counts["unpacked_weights"] == 210
    for name, tensor in unpacked.items():
        expected = round_trip(original[name], trained_on) if name.endswith("proj.weight") else original[name]
        assert torch.equal(tensor, expected.to(tensor.dtype)), name


def test_a_4_bit_only_base_with_dequantize_base(qlora_export: QloraExport, tmp_path: Path):
    """--dequantize-base: the 4-bit base's own weights are the merge base and its reference is the model as
    trained; the manifest names the 4-bit folder given and the folder it became."""
    args = qlora_export.args(tmp_path / "out", "--dequantize-base")
    four_bit = qlora_export.inputs / "base-4bit"
    args[args.index("--base") + 1] = str(four_bit)
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    section = manifest["merge_base"]
    assert (section["chosen"], section["mode"], section["candidates"]) == ("dequant", "4-bit base", [])
    assert section["trained_on"]["quant_type"] == "nf4" and section["trained_on"]["double_quant"]
    assert manifest["inputs"]["base"]["path"] == str(four_bit.resolve())
    unpacked = Path(manifest["inputs"]["base"]["dequantized"]["path"])
    assert "quantization_config" not in (unpacked / "config.json").read_text()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    quality = {row["label"]: row["metrics"] for row in report["artifacts"]}
    # the same model as the auto run's dequant candidate, judged against the same model as trained
    auto = rows(qlora_export.manifest["merge_base"], "dequant")
    assert quality["F16"]["mean_kld"] <= 1e-4 and auto["F16"]["kld_as_trained"] <= 1e-4
    # (Q8_0 rounds a float32 merge here, the candidate's float16 one there: close, not equal)
    assert quality["Q8_0"]["mean_kld"] < 2 * auto["Q8_0"]["kld_as_trained"]
    assert report["passed"]
    assert (
        "reference:as-trained" in manifest["stage_seconds"] and "dequant:unpack" in manifest["stage_seconds"]
    )
    assert not any(p.is_relative_to(four_bit) for p in (tmp_path / "out").rglob("*"))


@pytest.mark.parametrize(
    ("base", "extra", "says"),
    [
        ("base-4bit", ["--merge-base", "w16"], "--merge-base w16 needs the 16-bit weights"),
        ("base-4bit", ["--trained-on", "fp4"], "--trained-on fp4 was given with --dequantize-base"),
        ("16-bit", [], "the base is already a 16-bit model"),
    ],
)
def test_dequantize_base_refusals(qlora_export: QloraExport, tmp_path: Path, base: str, extra: list[str],
                                  says: str):  # fmt: skip
    args = qlora_export.args(tmp_path / "out", "--dequantize-base", *extra)
    if base != "16-bit":
        args[args.index("--base") + 1] = str(qlora_export.inputs / base)
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert says in " ".join(proc.stderr.split())
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the candidates as stages of a batch

CHOICE_STAGES = (
    "reference:as-trained",
    "reference:16-bit",
    *(f"{c}:{s}" for c in ("w16", "dequant") for s in ("merge", "convert", "quantize:Q8_0", "candidate")),
    "dequant:dequantize",
    "choose",
)


def test_the_merge_base_choice_is_a_graph_of_both_candidates_stages():
    """Built without running a stage: each candidate a sub-graph under its label, each score needing its
    reference, the dequant candidate's record its dequantized inputs, and the choice both candidates."""
    from types import SimpleNamespace

    from exporter.stages.qlora import CHOOSE, CandidatePlan, qlora_graph

    nothing: Any = None
    plan = CandidatePlan(NAME, None, (SimpleNamespace(name="Q8_0"),), nothing, nothing)
    graph = qlora_graph(nothing, nothing, nothing, "auto", True, plan)
    assert set(CHOICE_STAGES) <= set(graph.nodes)
    needs = {name: node.needs for name, node in graph.nodes.items()}
    assert needs["dequant:merge"] == ("dequant:dequantize",) and needs["w16:merge"] == ()
    assert needs["w16:quality:Q8_0"] == ("reference:as-trained", "w16:quantize:Q8_0")
    assert needs["dequant:quality-16:source"] == ("reference:16-bit", "dequant:convert")
    # a candidate's record reads its inputs, merge, convert, every quantization and every score
    assert set(needs["dequant:candidate"]) == {n for n in graph.nodes if n.startswith("dequant:")} - {
        "dequant:candidate"
    }
    assert needs[CHOOSE] == ("reference:as-trained", "reference:16-bit", "w16:candidate", "dequant:candidate")
    assert not graph.nodes[CHOOSE].heavy and graph.nodes["w16:quantize:Q8_0"].shared
    forced = qlora_graph(nothing, nothing, nothing, "dequant", False, plan)  # --no-check: nothing measured
    assert {name: node.needs for name, node in forced.nodes.items()} == {
        "dequant:dequantize": (),
        CHOOSE: ("dequant:dequantize",),
    }
    assert list(qlora_graph(nothing, nothing, nothing, "w16", False, plan).nodes) == [CHOOSE]


def write_batch_plan(folder: Path, export: QloraExport) -> Path:
    """A batch of the QLoRA export merge-quantize made: the same adapter, base, profile and evaluation data."""
    plan = folder / "plan.toml"
    plan.write_text(
        f'out = "out"\nprofiles = ["Q8_0"]\ncheck = true\neval_data = "{export.eval_data}"\n\n'
        f'[bases.smollm2]\npath = "{export.base}"\n\n'
        f'[[adapters]]\npath = "{export.inputs / "adapter"}"\nname = "{NAME}"\n'
    )
    return plan


def check_scheduled_choice(export: QloraExport, out: Path) -> list[dict[str, Any]]:
    """Both candidates' stages were nodes of the batch graph, the export's merge waited for the choice,
    and the batch kept what merge-quantize kept: its schedule's events."""
    from tests.test_batch import read_events

    events = read_events(out / "batch-schedule.jsonl")
    at = {(e["event"], e["stage"]): i for i, e in enumerate(events)}
    for stage in CHOICE_STAGES:
        assert ("start", f"{NAME}/{stage}") in at and ("end", f"{NAME}/{stage}") in at, stage
    assert at[("start", f"{NAME}/merge")] > at[("end", f"{NAME}/choose")]
    manifest = json.loads((out / NAME / "manifest.json").read_text())
    section, expected = manifest["merge_base"], export.manifest["merge_base"]
    assert (section["mode"], section["chosen"]) == ("auto", expected["chosen"])

    def artifacts(s: dict[str, Any]) -> dict[tuple[str, str], str]:
        return {(r["candidate"], r["profile"]): r["sha256"] for r in s["candidates"]}

    assert artifacts(section) == artifacts(expected)
    assert manifest["artifacts"][0]["sha256"] == export.manifest["artifacts"][0]["sha256"]
    # the candidates' stage times reached the export's run (from the Ray workers too)
    assert {"w16:merge", "dequant:merge", "dequant:total"} <= set(manifest["stage_seconds"])
    assert section["second_candidate_seconds"]["merge"] == manifest["stage_seconds"]["dequant:merge"]
    return events


def test_a_local_batch_schedules_both_candidates_within_its_memory_budget(qlora_export: QloraExport,
                                                                          tmp_path: Path):  # fmt: skip
    plan = write_batch_plan(tmp_path, qlora_export)
    proc = run_cli("batch", str(plan), "--cores", "2", "--max-memory", "3GB")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    events = check_scheduled_choice(qlora_export, tmp_path / "out")
    budget = 3 * 2**30
    assert all(e["memory_budget"] == budget and e["memory_in_use"] <= budget for e in events)
    memory = {e["stage"].split("/", 1)[1]: e["memory"] for e in events if e["event"] == "start"}
    # each candidate stage is estimated as the export's stage of its kind; the choice itself is light
    for stage in ("merge", "convert", "quantize:Q8_0", "quality:Q8_0"):
        assert memory[f"w16:{stage}"] == memory[f"dequant:{stage}"] == memory[stage] > 0, stage
    assert memory["dequant:quality-16:Q8_0"] == memory["quality:Q8_0"]
    assert memory["reference:as-trained"] == memory["reference:16-bit"] == memory["reference"] > 0
    assert memory["dequant:dequantize"] > 0 and memory["choose"] == memory["w16:candidate"] == 0
    assert f"{NAME}: merge base: " in proc.stdout


def test_a_ray_batch_schedules_both_candidates_as_tasks(qlora_export: QloraExport, tmp_path: Path):
    """The two-node loopback cluster of the batch tests, on this session's stage cache (the candidates are
    reused there, so this checks the scheduling, not the numbers again)."""
    import os
    import sys

    from tests.conftest import REPO
    from tests.test_batch import _namespaces_work, run_on_local_ray_cluster

    if not _namespaces_work():
        pytest.skip("needs unprivileged user and network namespaces (unshare)")
    plan = write_batch_plan(tmp_path, qlora_export)
    python = sys.executable
    batch = f"{python} -m exporter batch {plan} --executor ray --ray-address 127.0.0.1:6380"
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY=str(Path(python).parent / "ray"), COLUMNS="200")
    proc = run_on_local_ray_cluster(batch, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_scheduled_choice(qlora_export, tmp_path / "out")
