"""Chat templates in llama.cpp's own C++ Jinja engine (what llama-server, and so Ollama 0.30+, renders
with) against transformers' apply_chat_template, and what each Ollama version is given.

Templates: the Ollama corpus (../shared/ollama-templates, 35 real templates) and current families with
tools and thinking (tests/data/chat_templates, each from a cited source, see index.json). Each goes
through the C++ renderer built from the pinned llama.cpp on the probe conversations (plain turns, a
system prompt, several turns, tool definitions, a tool call with its result, thinking on and off), and
through the Go template translation for every target version; each either renders like transformers
or is refused with a message that says where it differs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from converters.chat_probes import template_capabilities
from converters.llama_tools import LlamaTools, locate_llama_tools
from converters.template_parity import TemplateParity, compare_probes, hf_template_render
from exporter.core.errors import InputError
from exporter.deploy.chat_template import (
    ChatTemplateError,
    jinja_render,
    special_token_strings,
    translate_chat_template,
)
from exporter.deploy.ollama_targets import TemplateChoice, choose_template
from exporter.inputs.ollama_version import CURRENT_OLLAMA, ollama_target
from tests.conftest import DemoExport, DemoInputs, run_cli
from tests.test_chat_template import CORPUS, corpus_templates

DATA = Path(__file__).parent / "data" / "chat_templates"
VERSIONS = ("0.29.2", "0.30.0", CURRENT_OLLAMA)
CORPUS_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}


def current_templates() -> dict[str, tuple[str, dict[str, str]]]:
    index = json.loads((DATA / "index.json").read_text())
    return {
        name: ((DATA / name).read_text(), {"bos_token": info["bos_token"], "eos_token": info["eos_token"]})
        for name, info in index.items()
    }


def all_templates() -> dict[str, tuple[str, dict[str, str]]]:
    found = current_templates()
    if (CORPUS / "templates.jsonl").is_file():
        for number, (family, template) in enumerate(corpus_templates()):
            found[f"corpus-{number:02d}-{family}"] = (template, CORPUS_TOKENS)
    return found


@pytest.fixture(scope="module")
def tools() -> LlamaTools:
    return locate_llama_tools()  # built by `make vendor`; a missing build fails with the fix


@pytest.fixture(scope="module")
def parities(tools: LlamaTools) -> dict[str, TemplateParity]:
    results = {}
    for name, (template, tokens) in all_templates().items():
        source = {"template": template, **tokens}
        results[name] = compare_probes(
            template, hf_template_render(template, tokens), source, tools, tokens["bos_token"]
        )
    return results


# Where llama.cpp's engine renders unlike transformers, and how. These templates silently drop a system
# message; llama.cpp's chat code sees that the template has no system role and folds the system prompt
# into the first user turn instead (common/chat.cpp, workaround::system_message_not_supported).
KNOWN_DIFFERENCES = {
    "corpus-09-zephyr": ["system"],
    "corpus-27-phi-3": ["system"],
    "corpus-28-phi-3": ["system"],
    "corpus-30-chatqa": ["system"],
}
# Templates with a date default (Llama-3.1: "26 Jul 2024"): llama.cpp fills in today's date.
DATED = {"meta-llama-Llama-3.1-8B-Instruct.jinja"}


def test_every_template_renders_in_llama_cpp_as_in_transformers(parities: dict[str, TemplateParity]) -> None:
    differing = {
        n: [r.kind for r in p.results if r.status == "differs"] for n, p in parities.items() if not p.passed
    }
    expected = {n: kinds for n, kinds in KNOWN_DIFFERENCES.items() if n in parities}
    assert differing == expected
    for name in differing:
        for problem in parities[name].problems():  # each says exactly where the two part
            assert "transformers renders '" in problem and "where llama.cpp renders '" in problem, problem
    dated = {n for n, p in parities.items() if any(r.status == "date" for r in p.results)}
    assert dated == DATED
    assert all(
        r.status == "date"
        for r in parities["meta-llama-Llama-3.1-8B-Instruct.jinja"].results
        if r.kind == "plain"
    )


def test_tools_and_thinking_are_compared_where_templates_have_them(
    parities: dict[str, TemplateParity],
) -> None:
    statuses = {n: {r.kind: r.status for r in p.results} for n, p in parities.items()}
    for name in ("Qwen-Qwen3-0.6B.jinja", "Qwen3.5-4B.jinja", "ibm-granite-granite-3.3-2B-Instruct.jinja"):
        assert parities[name].capabilities == ("tools", "thinking")
        assert set(statuses[name].values()) == {"equal"}, (name, statuses[name])  # all seven probes compared
    for name in (
        "Mistral-Small-3.2-24B-Instruct-2506.jinja",
        "meta-llama-Llama-3.2-3B-Instruct.jinja",
        "openai-gpt-oss-120b.jinja",
    ):
        assert statuses[name]["tools"] == statuses[name]["tool-call"] == "equal", name
    assert statuses["HuggingFaceTB-SmolLM3-3B.jinja"]["thinking-off"] == "equal"
    tool_calls = sum(s["tool-call"] in ("equal", "date") for s in statuses.values())
    thinking = sum(s["thinking-off"] == "equal" for s in statuses.values())
    assert (tool_calls, thinking) == (9, 4)


def test_a_template_llama_cpp_cannot_parse_is_refused(tools: LlamaTools) -> None:
    template = "{% with greeting = 'Hi' %}{{ greeting }}{% endwith %}{% for m in messages %}{{ m.content }}{% endfor %}"
    tokens = {"bos_token": "", "eos_token": ""}
    parity = compare_probes(
        template, hf_template_render(template, tokens), {"template": template, **tokens}, tools
    )
    assert parity.parse_error == "Unknown statement: with" and not parity.passed
    for version in VERSIONS:
        with pytest.raises(
            InputError, match=r"llama.cpp's C\+\+ Jinja engine cannot parse it \(Unknown statement: with\)"
        ):
            choose_template(ollama_target(version), template, None, parity, "a template")


def outcome(name: str, template: str, tokens: dict[str, str], parity: TemplateParity, version: str) -> str:
    """What an export for Ollama `version` does with this template: the renderer chosen, or "refused"."""
    try:
        translation = translate_chat_template(
            template,
            jinja_render(template, tokens),
            tokens["bos_token"],
            True,
            special_token_strings(template),
            source=name,
        )
        error = None
    except ChatTemplateError as exc:
        translation, error = None, str(exc)
    try:
        choice = choose_template(ollama_target(version), template, error, parity, name)
    except InputError as exc:
        assert name in str(exc) and len(str(exc)) > 100  # one paragraph naming the template and the fix
        return "refused"
    assert isinstance(choice, TemplateChoice)
    if choice.source == "go_template":
        assert translation is not None and choice.write_template  # verified identical on the conversations
        assert not template_capabilities(template)
    if choice.source == "gguf_chat_template":
        assert parity.passed and template_capabilities(template)
    return choice.source


def test_each_ollama_version_gets_a_verified_renderer_or_a_refusal(
    parities: dict[str, TemplateParity],
) -> None:
    outcomes = {
        version: {
            name: outcome(name, t, tokens, parities[name], version)
            for name, (t, tokens) in all_templates().items()
        }
        for version in VERSIONS
    }
    with_tools = {n for n, (t, _) in all_templates().items() if template_capabilities(t)}
    assert len(with_tools) == 10
    for version in VERSIONS:
        by_name = outcomes[version]
        if ollama_target(version).renders_gguf_jinja:
            assert {n: by_name[n] for n in with_tools} == {
                n: "harmony" if n == "openai-gpt-oss-120b.jinja" else "gguf_chat_template" for n in with_tools
            }
        else:  # a Go TEMPLATE carries plain turns only: tools and thinking are refused before 0.30
            assert {by_name[n] for n in with_tools} == {"refused"}
        plain = {n: o for n, o in by_name.items() if n not in with_tools}
        refused = sorted(n for n, o in plain.items() if o == "refused")
        assert refused == (
            ["corpus-30-chatqa"] if "corpus-30-chatqa" in plain else []
        )  # no exact Go translation
        assert {o for n, o in plain.items() if n not in refused} == {"go_template"}


# ------------------------------------------------------------------------------------ through the CLI


def test_demo_export_records_what_each_runtime_renders(demo_export: DemoExport) -> None:
    manifest = demo_export.manifest
    assert manifest["ollama"] == {
        "ollama_version": CURRENT_OLLAMA,
        "renders_with": "go_template",
        "reason": manifest["ollama"]["reason"],
        "template_capabilities": [],
        "modelfile_template": True,
        "llama_server_note": None,
    }
    assert "has no tools and no thinking" in manifest["ollama"]["reason"]
    jinja = manifest["llama_cpp_chat_template"]
    assert jinja["passed"] and jinja["parse_error"] is None
    assert {r["kind"]: r["status"] for r in jinja["results"]} == {
        "plain": "equal",
        "system": "equal",
        "turns": "equal",
        "tools": "not-applicable",
        "tool-call": "not-applicable",
        "thinking-on": "not-applicable",
        "thinking-off": "not-applicable",
    }
    assert f"Ollama {CURRENT_OLLAMA} renders chats with go_template" in demo_export.stdout
    for profile in ("Q4_K_M", "Q8_0", "Q2_K"):
        stops = manifest["stops"][profile]
        assert stops["terminator"] == "<|im_end|>" and stops["terminator_is_eog"], stops
        assert stops["passed"] and stops["stop_token"] == "<|im_end|>" and stops["generated_tokens"] < 64
    modelfile = (demo_export.out / "smollm2-pirate-Q4_K_M.Modelfile").read_text()
    assert f"# for Ollama {CURRENT_OLLAMA}: renders with go_template;" in modelfile


def tools_adapter(demo_inputs: DemoInputs, target: Path) -> Path:
    """The demo adapter as a trainer saves it with its tokenizer and a chat template with tools
    (Qwen2.5's, ChatML like SmolLM2's)."""
    shutil.copytree(demo_inputs.adapter, target)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_inputs.base / name, target / name)
    shutil.copy(DATA / "Qwen-Qwen2.5-7B-Instruct.jinja", target / "chat_template.jinja")
    return target


def test_a_template_with_tools_is_served_from_the_gguf_on_current_ollama(
    demo_inputs: DemoInputs, tmp_path: Path
) -> None:
    adapter = tools_adapter(demo_inputs, tmp_path / "adapter")
    common = [
        "--adapter",
        str(adapter),
        "--base",
        str(demo_inputs.base),
        "--name",
        "tools",
        "--profile",
        "Q8_0",
    ]
    out = tmp_path / "current"
    proc = run_cli("merge-quantize", *common, "--out", str(out), "--no-check")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ollama"]["renders_with"] == "gguf_chat_template"
    assert manifest["ollama"]["template_capabilities"] == ["tools"]
    results = {r["kind"]: r["status"] for r in manifest["llama_cpp_chat_template"]["results"]}
    assert results["tools"] == results["tool-call"] == "equal"
    assert f"Ollama {CURRENT_OLLAMA} renders chats with gguf_chat_template" in proc.stdout
    modelfile = (out / "tools-Q8_0.Modelfile").read_text()
    assert "renders with gguf_chat_template" in modelfile and "TEMPLATE" in modelfile

    old = tmp_path / "old"
    proc = run_cli("merge-quantize", *common, "--out", str(old), "--no-check", "--ollama-version", "0.29.2")
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "which Ollama 0.29.2 renders only through the Modelfile's Go TEMPLATE" in proc.stderr
    assert not (old / "manifest.json").exists() and not list(old.glob("*.Modelfile"))
