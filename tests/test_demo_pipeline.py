"""merge-quantize end to end on the real SmolLM2 demo model, the real converter and the real quantizer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from converters.gguf_header import read_gguf_header
from converters.llama_runtime import greedy_generate
from converters.metrics import greedy_agreement
from exporter.core.hashing import sha256_file
from tests.conftest import DEMO_PROMPTS, DemoExport, Reference, copy_export, export_args

NEW_TOKENS = 24


def test_adapter_changes_the_greedy_answer(reference: Reference):
    question = DEMO_PROMPTS[0]
    with_adapter = reference.tokenizer.decode(reference.greedy(question, NEW_TOKENS))
    without = reference.tokenizer.decode(reference.greedy(question, NEW_TOKENS, with_adapter=False))
    assert with_adapter != without
    assert with_adapter.startswith("Arr"), with_adapter
    assert "Arr" not in without, without


def test_merged_f16_gguf_continues_exactly_like_the_unmerged_peft_model(demo_export: DemoExport, reference):
    prompts = [reference.prompt_ids(q) for q in DEMO_PROMPTS]
    gguf_continuations = greedy_generate(demo_export.out / "smollm2-pirate-F16.gguf", prompts, NEW_TOKENS)
    for question, ours in zip(DEMO_PROMPTS, gguf_continuations, strict=True):
        expected = reference.greedy(question, NEW_TOKENS)
        assert ours == expected, (
            f"{question!r}: GGUF {reference.tokenizer.decode(ours)!r} vs PEFT {reference.tokenizer.decode(expected)!r}"
        )


@pytest.mark.parametrize(("profile", "ftype"), [("Q8_0", 7), ("Q4_K_M", 15)])
def test_quantized_files_carry_their_file_type_and_generate(
    demo_export: DemoExport, reference, profile, ftype
):
    path = demo_export.gguf(profile)
    header = read_gguf_header(path)
    assert header.file_type == ftype
    assert header.architecture == "llama"
    assert "<|im_start|>" in (header.chat_template or "")
    [continuation] = greedy_generate(path, [reference.prompt_ids(DEMO_PROMPTS[0])], NEW_TOKENS)
    text = reference.tokenizer.decode(continuation)
    assert len(continuation) >= 5 and re.search(r"[A-Za-z]{3}", text), text
    if profile == "Q8_0":
        assert text.startswith("Arr"), text  # the fine-tune survives 8-bit quantization


def test_manifest_records_inputs_tools_and_artifacts(demo_export: DemoExport, demo_inputs):
    manifest = demo_export.manifest
    assert manifest["tools"]["llama.cpp"] == "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
    assert manifest["tools"]["llama-cpp-python"] == "0.3.36"
    adapter_files = manifest["inputs"]["adapters"][0]["files"]
    assert adapter_files["adapter_model.safetensors"] == sha256_file(
        demo_inputs.adapter / "adapter_model.safetensors"
    )
    assert manifest["inputs"]["base"]["files"]["model.safetensors"] == sha256_file(
        demo_inputs.base / "model.safetensors"
    )
    by_profile = {a["profile"]: a for a in manifest["artifacts"]}
    assert set(by_profile) == {"Q4_K_M", "Q8_0", "Q2_K"}
    for profile, record in by_profile.items():
        path = demo_export.out / record["path"]
        assert path.name == f"smollm2-pirate-{profile}.gguf"
        assert record["sha256"] == sha256_file(path)
        assert record["size_bytes"] == path.stat().st_size
        assert record["seconds"] > 0
    assert by_profile["Q4_K_M"]["bits_per_weight"] < by_profile["Q8_0"]["bits_per_weight"] < 16
    # The F16 GGUF is hashed while the converter writes it: the recorded digest is the file's.
    (f16,) = manifest["intermediates"]
    assert f16["sha256"] == sha256_file(demo_export.out / f16["path"])
    assert manifest["merge"]["merged_tensors"] == 30 * 7
    assert not list(demo_export.out.glob(".*partial*"))


def test_modelfiles_point_at_the_exact_file_with_template_and_stops(demo_export: DemoExport):
    for profile in ("Q4_K_M", "Q8_0", "Q2_K"):
        path = demo_export.out / f"smollm2-pirate-{profile}.Modelfile"
        text = path.read_text()
        assert "\r" not in text
        from_line = next(line for line in text.splitlines() if line.startswith("FROM "))
        target = (path.parent / from_line.removeprefix("FROM ")).resolve()
        assert target == demo_export.gguf(profile).resolve() and target.is_file()
        assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
        assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
        assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
        assert 'LICENSE """' in text and "Apache License" in text  # the base's license file, carried through


def test_merged_folder_keeps_the_model_files_the_gguf_does_not_replace(demo_export: DemoExport):
    merged = demo_export.out / "merged"
    assert not (merged / "model.safetensors").exists()  # released: the F16 GGUF holds the weights
    for name in (
        "config.json",
        "edge-export-merge.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
        "LICENSE",
    ):
        assert (merged / name).is_file(), name


def test_cli_prints_the_result_table(demo_export: DemoExport):
    for fragment in ("smollm2-pirate-Q4_K_M.gguf", "smollm2-pirate-Q8_0.gguf", "bits/weight", "manifest"):
        assert fragment in demo_export.stdout


def test_second_run_refuses_then_force_replaces(demo_export: DemoExport, demo_inputs, tmp_path: Path):
    from tests.conftest import run_cli

    export = DemoExport(copy_export(demo_export.out, tmp_path / "export"), demo_export.manifest, "")
    args = export_args(demo_inputs, export.out)
    refused = run_cli(*args)
    assert refused.returncode == 2 and "--force" in refused.stderr
    before = {p: sha256_file(demo_export.gguf(p)) for p in ("F16", "Q4_K_M", "Q8_0", "Q2_K")}
    forced = run_cli(*args, "--force")
    assert forced.returncode == 0, forced.stderr
    # Same inputs, same bytes.
    assert {p: sha256_file(export.gguf(p)) for p in before} == before
    assert export.report["reference"]["from_cache"] is True  # the reference was not recomputed


def test_header_reader_agrees_with_the_gguf_package(demo_export: DemoExport):
    from gguf import GGUFReader

    for profile in ("F16", "Q4_K_M"):
        path = demo_export.gguf(profile)
        ours = read_gguf_header(path)
        reader = GGUFReader(str(path))
        assert ours.file_type == reader.get_field("general.file_type").contents()
        assert ours.architecture == reader.get_field("general.architecture").contents()
        assert ours.chat_template == reader.get_field("tokenizer.chat_template").contents()
        assert ours.n_tensors == len(reader.tensors)
        assert ours.n_params == sum(int(t.n_elements) for t in reader.tensors)


def test_tokenizer_parity_and_embedded_templates_are_checked(demo_export: DemoExport):
    parity = demo_export.manifest["tokenizer_parity"]
    assert parity["passed"] and parity["mismatches"] == [] and not parity["double_bos"]
    assert parity["texts"] >= 10  # plain, special-token and chat-formatted texts
    assert "tokenizer parity: HF and llama.cpp agree" in demo_export.stdout
    for record in demo_export.manifest["modelfiles"]:
        assert record["chat_template_family"] == "chatml" and record["verified_conversations"] == 4


def test_modelfile_from_gguf_matches_the_exported_one(demo_export: DemoExport, tmp_path: Path):
    from tests.conftest import run_cli

    gguf = tmp_path / "model.gguf"
    gguf.symlink_to(demo_export.gguf("Q4_K_M"))
    proc = run_cli("modelfile", "--gguf", str(gguf))
    assert proc.returncode == 0, proc.stderr
    assert "template chatml, verified on 4 conversations" in proc.stdout
    written = (tmp_path / "model.Modelfile").read_text()
    exported = (demo_export.out / "smollm2-pirate-Q4_K_M.Modelfile").read_text()
    for line in ("TEMPLATE", "SYSTEM", "PARAMETER stop", "PARAMETER num_ctx"):
        assert [x for x in written.splitlines() if x.startswith(line)] == [
            x for x in exported.splitlines() if x.startswith(line)
        ], line
    assert run_cli("modelfile", "--check", str(tmp_path / "model.Modelfile")).returncode == 0


def test_the_base_floor_greedy_read_teacher_forced_is_what_decoding_finds(
    demo_export: DemoExport, demo_inputs, reference: Reference
):
    """The base floor's greedy figures come from feeding the base the reference's continuations; decoding the
    base freely in PyTorch and comparing finds the same first divergences. The GGUFs' figures are their own
    greedy decodes in llama.cpp against the same continuations."""
    import torch

    from exporter.inputs.adapter import read_adapter
    from exporter.inputs.options import QualityOptions
    from exporter.inputs.records import ModelInputs
    from exporter.stages.quality import reference_for
    from tests.conftest import DEMO_EVAL

    inputs = ModelInputs.hashed(demo_inputs.base, (read_adapter(demo_inputs.adapter),))
    options = QualityOptions(eval_data=DEMO_EVAL)
    ours = reference_for(inputs, demo_export.out / "merged", options)
    eos = reference.peft_model.generation_config.eos_token_id
    stops = {*(eos if isinstance(eos, list) else [eos]), reference.tokenizer.eos_token_id}
    decoded = []
    with torch.no_grad(), reference.peft_model.disable_adapter():
        for prompt in ours.eval.prompts:
            ids = torch.tensor([prompt])
            out = reference.peft_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=options.max_new_tokens,
                do_sample=False,
            )[0, len(prompt) :].tolist()
            decoded.append(out[: next((i for i, t in enumerate(out) if t in stops), len(out))])
    found = greedy_agreement(ours.greedy, decoded)["first_divergence"]
    assert demo_export.report["base_floor"]["metrics"]["first_divergence"] == found
    # the F16 GGUF answers as the reference does, so its drafts were all confirmed in the one pass
    assert demo_export.report["reference"]["greedy_answers"].endswith(
        "0 of 6 decoded on by the reference from the draft's first wrong token"
    )
    rows = {row["label"]: row["metrics"] for row in demo_export.report["artifacts"]}
    for label in ("F16", "Q2_K"):
        decoded = greedy_generate(
            demo_export.gguf(label), ours.eval.prompts, options.max_new_tokens, n_ctx=1024
        )
        found = greedy_agreement(ours.greedy, decoded)["first_divergence"]
        assert rows[label]["first_divergence"] == found, label


def test_a_teacher_forced_greedy_divergence_is_where_decoding_diverges(reference: Reference):
    """The adapter at half strength shares some tokens of the full adapter's answers, then leaves them: its
    top tokens on the full adapter's continuations put each divergence where its own decode puts it."""
    import numpy as np
    import torch
    from peft.tuners.lora.layer import LoraLayer

    from converters.metrics import greedy_divergence

    model, new_tokens = reference.peft_model, 16
    stops = {reference.tokenizer.eos_token_id}
    prompts = [reference.prompt_ids(q) for q in DEMO_PROMPTS]
    full = [reference.greedy(q, new_tokens) for q in DEMO_PROMPTS]
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.scale_layer(0.5)
    try:
        half = [reference.greedy(q, new_tokens) for q in DEMO_PROMPTS]
        with torch.no_grad():
            tops = [
                model(input_ids=torch.tensor([[*p, *c]])).logits[0].argmax(-1).numpy()
                for p, c in zip(prompts, full, strict=True)
            ]
    finally:
        for layer in layers:
            layer.unscale_layer(0.5)
    expected = greedy_agreement(full, half)["first_divergence"]
    found = [
        greedy_divergence(np.asarray(top), len(p), c, new_tokens, stops)
        for top, p, c in zip(tops, prompts, full, strict=True)
    ]
    assert found == expected
    assert any(d is None or d > 0 for d in expected), "half strength never shared a token: nothing compared"
    assert any(d is not None for d in expected), "half strength never diverged: nothing compared"
