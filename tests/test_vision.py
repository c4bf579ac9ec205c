"""Vision-language fine-tunes through the real pipeline: a tiny real SmolVLM and a tiny real Gemma-3, each
with a LoRA trained on images (tests/vlm_fixture.py), merged, converted to a language-model GGUF and an mmproj GGUF, quantized, checked with
images through llama.cpp's libmtmd against the unmerged model in transformers, and served by llama-server."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from converters.gguf_header import read_gguf_metadata
from converters.hashing import sha256_file
from converters.llama_server import running_llama_server
from converters.llama_tools import locate_llama_tools
from exporter.deploy.modelfile_check import parse_modelfile
from exporter.deploy.serve_config import read_serve_config
from tests.conftest import DemoInputs, run_cli
from tests.test_llama_server import server_arguments

F16_IMAGE_KLD = 1e-4  # the F16 pair against the unmerged model, on the answers about images


@pytest.fixture(scope="module")
def vlm(demo_inputs: DemoInputs) -> tuple[Path, Path]:
    from tests.vlm_fixture import smolvlm

    return smolvlm(demo_inputs.base)


@pytest.fixture(scope="module")
def gemma3_vlm(demo_inputs: DemoInputs) -> tuple[Path, Path]:
    from tests.vlm_fixture import gemma3

    return gemma3(demo_inputs.base)


def _export(base: Path, adapter: Path, out: Path, *extra: str) -> Any:
    # fmt: off
    return run_cli("merge-quantize", "--adapter", str(adapter), "--base", str(base), "--name", "vlm",
                   "--out", str(out), *extra)
    # fmt: on


@pytest.fixture(scope="module", params=["smolvlm", "gemma3"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """Each family's export, F16 (the source), Q8_0 and Q4_K_M, checked with the built-in image rows."""
    inputs = request.getfixturevalue("vlm" if request.param == "smolvlm" else "gemma3_vlm")
    out = tmp_path_factory.mktemp(request.param) / "out"
    proc = _export(*inputs, out, "--profile", "Q8_0", "--profile", "Q4_K_M")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "with images" in proc.stdout
    return out, json.loads((out / "report.json").read_text())


def _row(report: dict[str, Any], label: str) -> dict[str, Any]:
    return next(a for a in report["artifacts"] if a["label"] == label)


def test_images_are_scored_exactly_through_libmtmd(exported: tuple[Path, dict[str, Any]]) -> None:
    out, report = exported
    f16, q8 = _row(report, "F16")["metrics"], _row(report, "Q8_0")
    base = report["base_floor"]["metrics"]
    assert f16["image_rows"] == 3 and f16["image_tokens"] > 30
    assert f16["image_mean_kld"] <= F16_IMAGE_KLD and f16["image_top1"] >= 0.95
    # the adapter measurably moves the answers about images, and the export keeps that move
    assert base["image_mean_kld"] > 100 * max(f16["image_mean_kld"], 1e-9)
    assert base["image_mean_kld"] > 1e-5
    gates = {g["gate"]: g for g in q8["gates"]}
    assert gates["max_mean_kld (images)"]["passed"] and "min_top1 (images)" not in gates
    assert q8["metrics"]["image_mean_kld"] < base["image_mean_kld"]
    assert "## With images" in (out / "report.md").read_text()


def test_mmproj_is_deployed_beside_every_gguf(exported: tuple[Path, dict[str, Any]]) -> None:
    out, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    mmproj = out / "vlm-mmproj-F16.gguf"
    assert manifest["mmproj"]["path"] == mmproj.name
    assert manifest["mmproj"]["sha256"] == sha256_file(mmproj)
    values, tensors = read_gguf_metadata(mmproj, ("general.architecture", "general.type"))
    assert values == {"general.architecture": "clip", "general.type": "mmproj"}
    assert any(name.startswith("v.blk.") for name in tensors)
    for label in ("Q8_0", "Q4_K_M"):
        modelfile = out / f"vlm-{label}.Modelfile"
        froms = [line for line in modelfile.read_text().splitlines() if line.startswith("FROM ")]
        assert froms == [f"FROM ./vlm-{label}.gguf", "FROM ./vlm-mmproj-F16.gguf"]
        assert parse_modelfile(modelfile)[1] == []
        command = read_serve_config(out / f"vlm-{label}.llama-server.json")["command"]
        assert command[command.index("--mmproj") + 1] == "./vlm-mmproj-F16.gguf"


def test_check_rescores_the_images(exported: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, report = exported
    copy = Path(shutil.copytree(out, tmp_path / "out"))
    junit = tmp_path / "junit.xml"
    proc = run_cli("check", "--manifest", str(copy / "manifest.json"), "--junit", str(junit))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    again = json.loads((copy / "report.json").read_text())
    assert (
        _row(again, "Q8_0")["metrics"]["image_mean_kld"] == _row(report, "Q8_0")["metrics"]["image_mean_kld"]
    )
    assert "max_mean_kld (images)" in junit.read_text()
    mmproj = next(copy.glob("*-mmproj-F16.gguf"))
    with mmproj.open("ab") as handle:
        handle.write(b"\0")
    proc = run_cli("check", "--manifest", str(copy / "manifest.json"))
    assert proc.returncode == 2 and mmproj.name in proc.stderr, proc.stderr + proc.stdout


def test_llama_server_answers_an_image_request(exported: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, _ = exported
    config = read_serve_config(out / "vlm-Q8_0.llama-server.json")
    image = Path(__file__).parents[1] / "exporter" / "data" / "eval_images" / "shapes.png"
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
    tools = locate_llama_tools()
    with running_llama_server(tools, server_arguments(config), out, tmp_path / "server.log") as server:
        reply = server.post("/v1/chat/completions", body)
    usage = reply["usage"]
    # the prompt holds the image's embeddings (SmolVLM: a tile and the overview of 4 each; Gemma-3: 4) and text
    assert usage["prompt_tokens"] > 12 and usage["completion_tokens"] >= 1
    assert reply["choices"][0]["message"]["role"] == "assistant"


def test_mmproj_q8_0(vlm: tuple[Path, Path], tmp_path: Path) -> None:
    proc = _export(*vlm, tmp_path / "out", "--profile", "Q8_0", "--mmproj-type", "q8_0", "--no-check")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    mmproj = tmp_path / "out" / "vlm-mmproj-Q8_0.gguf"
    assert mmproj.stat().st_size < (tmp_path / "out" / "vlm-F16.gguf").stat().st_size
    assert "FROM ./vlm-mmproj-Q8_0.gguf" in (tmp_path / "out" / "vlm-Q8_0.Modelfile").read_text()


def test_runtime_lora_on_a_vision_base(demo_inputs: DemoInputs, tmp_path: Path) -> None:
    """An adapter on the language model alone runs as a runtime LoRA beside the base's projector."""
    from tests.vlm_fixture import smolvlm_language_only

    base, adapter = smolvlm_language_only(demo_inputs.base)
    out = tmp_path / "out"
    # fmt: off
    proc = run_cli("runtime-lora", "--adapter", str(adapter), "--base", str(base), "--out", str(out), "--name", "vlm",
                   "--profile", "Q8_0", "--ollama-version", "0.33.0")
    # fmt: on
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads((out / "report.json").read_text())
    pair = report["pairs"][0]["runtime"]
    floor = report["base_floor"]["adapter"]
    assert pair["metrics"]["image_mean_kld"] < floor["image_mean_kld"] / 100
    assert {g["gate"] for g in pair["gates"]} >= {"max_mean_kld", "max_mean_kld (images)"} and pair[
        "gates_passed"
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mmproj"]["sha256"] == sha256_file(out / "vlm-mmproj-F16.gguf")
    lines = [line for line in (out / "adapter-Q8_0.Modelfile").read_text().splitlines() if line[:1].isupper()]
    assert lines[:3] == ["FROM ./vlm-Q8_0.gguf", "FROM ./vlm-mmproj-F16.gguf", "ADAPTER ./adapter.lora.gguf"]
    config = read_serve_config(out / "vlm-Q8_0.llama-server.json")
    assert "--mmproj" in config["command"] and "--lora" in config["command"]
    image = Path(__file__).parents[1] / "exporter" / "data" / "eval_images" / "chart.png"
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}
    with running_llama_server(
        locate_llama_tools(), server_arguments(config), out, tmp_path / "server.log"
    ) as server:
        reply = server.post("/v1/chat/completions", {**body, "lora": config["requests"]["adapter"]["lora"]})
    assert reply["usage"]["prompt_tokens"] > 12 and reply["usage"]["completion_tokens"] >= 1


def _copy(base: Path, target: Path) -> Path:
    shutil.copytree(base, target, copy_function=shutil.copy)
    return target


def _refused(proc: Any, out: Path, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr + proc.stdout
    text = " ".join((proc.stderr + proc.stdout).split())
    for word in words:
        assert word in text, text
    assert not out.exists() or not any(out.iterdir())


def test_bad_vision_inputs_are_refused_before_any_work(vlm: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = vlm
    out = tmp_path / "out"
    bare = _copy(base, tmp_path / "no-processor")
    (bare / "processor_config.json").unlink()
    _refused(
        _export(bare, adapter, out, "--no-check"), out, "no image processor settings", "processor_config.json"
    )
    other = _copy(base, tmp_path / "other-family")
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["PaliGemmaForConditionalGeneration"]
    (other / "config.json").write_text(json.dumps(config))
    _refused(_export(other, adapter, out, "--no-check"), out, "cannot write its multimodal projector")
    unnamed = _copy(base, tmp_path / "unnamed-text")
    config = json.loads((unnamed / "config.json").read_text())
    del config["text_config"]["architectures"]
    (unnamed / "config.json").write_text(json.dumps(config))
    _refused(_export(unnamed, adapter, out, "--no-check"), out, "text_config")
    proc = run_cli("runtime-lora", "--adapter", str(adapter), "--base", str(base), "--out", str(out))
    _refused(proc, out, "trains the vision side", "runtime LoRA to the language model only", "merge-quantize")


def test_gemma3_saved_by_transformers_5_is_refused(gemma3_vlm: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base, adapter = gemma3_vlm
    resaved = _copy(base, tmp_path / "resaved")
    weights = resaved / "model.safetensors"
    tensors = {
        k.replace("vision_tower.vision_model.", "vision_tower."): v
        for k, v in load_file(str(weights)).items()
    }
    save_file(tensors, str(weights), metadata={"format": "pt"})
    out = tmp_path / "out"
    _refused(_export(resaved, adapter, out, "--no-check"), out, "vision_tower.", "released checkpoint")


def test_missing_or_unreadable_images_are_refused(vlm: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = vlm
    out = tmp_path / "out"
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_text("not an image")
    text = {"text": "Plain text rows are scored as usual beside the rows with images. " * 8}
    for name, words in (("missing.png", ("does not exist",)), ("broken.png", ("not a readable image",))):
        row = {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "path": name}, {"type": "text", "text": "What?"}],
                },
                {"role": "assistant", "content": "A thing."},
            ]
        }
        eval_file = data / f"eval-{name}.jsonl"
        eval_file.write_text(json.dumps(text) + "\n" + json.dumps(row) + "\n")
        proc = _export(base, adapter, out, "--profile", "Q8_0", "--eval-data", str(eval_file))
        _refused(proc, out, f"{eval_file} line 2", *words)
