"""Chat template translation: the Go evaluator against Ollama's own renders, every family of the
real-world corpus translated and verified, golden Modelfiles per family, and the refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from exporter.deploy.chat_template import (
    VERIFY_CONVERSATIONS,
    ChatTemplateError,
    TemplateTranslation,
    jinja_render,
    ollama_render,
    special_token_strings,
    translate_chat_template,
)
from exporter.deploy.gotemplate import GoTemplateError, render_go_template
from exporter.deploy.modelfile import spec_from_translation, write_modelfile
from exporter.deploy.modelfile_check import parse_modelfile

CORPUS = Path(
    os.environ.get(
        "EDGE_EXPORT_OLLAMA_TEMPLATES", Path(__file__).resolve().parents[2] / "shared" / "ollama-templates"
    )
)
GOLDEN = Path(__file__).parent / "golden" / "modelfiles"
needs_corpus = pytest.mark.skipif(
    not (CORPUS / "templates.jsonl").is_file(),
    reason=f"the Ollama template corpus is not at {CORPUS} (set EDGE_EXPORT_OLLAMA_TEMPLATES)",
)

# Not in the corpus: Gemma-3's and Command-R's templates as their model repositories ship them.
GEMMA3 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] "
    "+ '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception(\"Conversation roles "
    "must alternate user/assistant/user/assistant/...\") }}{%- endif -%}{%- if (message['role'] == 'assistant') "
    "-%}{%- set role = \"model\" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}"
    "{{'<start_of_turn>model\n'}}{%- endif -%}"
)
COMMAND_R = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% if system_message != false %}"
    "{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + system_message + '<|END_OF_TURN_TOKEN|>' }}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set content = message['content'] %}{% if message['role'] == 'user' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + content.strip() + '<|END_OF_TURN_TOKEN|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' + content.strip() "
    "+ '<|END_OF_TURN_TOKEN|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}


def corpus_templates() -> list[tuple[str, str]]:
    lines = (CORPUS / "templates.jsonl").read_text().splitlines()
    return [next(iter(json.loads(line).items())) for line in lines]


def translate(template: str, bos: str = "<s>", adds_bos: bool = True) -> TemplateTranslation:
    tokens = {"bos_token": bos, "eos_token": SPECIAL["eos_token"]}
    special = special_token_strings(template) | {bos, tokens["eos_token"]}
    return translate_chat_template(template, jinja_render(template, tokens), bos, adds_bos, special)


def ollama_data(messages: list[dict[str, str]]) -> dict:
    return {
        "System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
        "Prompt": "",
        "Response": "",
        "Tools": None,
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
    }


@needs_corpus
@pytest.mark.parametrize("family", sorted(p.stem for p in (CORPUS / "gotmpl").glob("*.gotmpl")))
def test_evaluator_reproduces_ollamas_own_renders(family: str):
    conversations = json.loads((CORPUS / "conversations.json").read_text())
    template = (CORPUS / "gotmpl" / f"{family}.gotmpl").read_text()
    for case, messages in conversations.items():
        expected = (CORPUS / "renders" / family / case).read_text()
        assert render_go_template(template, ollama_data(messages)) == expected, case


def test_evaluator_refuses_syntax_outside_its_subset():
    with pytest.raises(GoTemplateError):
        render_go_template("{{ with .System }}{{ . }}{{ end }}", {"System": "x"})
    with pytest.raises(GoTemplateError):
        render_go_template("{{ if .System }}never closed", {"System": "x"})
    assert render_go_template('{{ "{{" }}{{- " x " -}} y', {}) == "{{ x y"


@needs_corpus
def test_every_corpus_template_translates_and_verifies_or_is_refused_clearly():
    translated, refused = {}, []
    for index, (family, template) in enumerate(corpus_templates()):
        try:
            translated[index] = (family, translate(template))
        except ChatTemplateError as exc:
            assert "could not be translated" in str(exc) and "export again" in str(exc)
            refused.append(family)
    assert len(translated) >= 34, refused
    for family, translation in translated.values():
        assert translation.verified_conversations >= 2, family
        assert translation.turn_markers, family
        assert "{{ .Prompt }}" not in translation.go_template
    # The families the issue names are all among the translated ones.
    names = {t.family for _, t in translated.values()}
    assert {"chatml", "llama3", "mistral", "gemma", "phi-3", "zephyr", "alpaca", "llama2"} <= names


@needs_corpus
@pytest.mark.parametrize(
    ("index", "family"), [(1, "chatml"), (6, "chatml"), (22, "llama3"), (2, "zephyr"), (29, "phi-3")]
)
def test_where_jinja_agrees_with_ollamas_family_template_our_render_is_ollamas(index: int, family: str):
    source_family, template = corpus_templates()[index]
    translation = translate(template)
    assert translation.family == family
    for case, messages in json.loads((CORPUS / "conversations.json").read_text()).items():
        expected = (CORPUS / "renders" / source_family / case).read_text()
        assert ollama_render(translation.go_template, messages, translation.default_system) == expected, case


@needs_corpus
def test_qwen_default_system_prompt_becomes_system():
    _, template = corpus_templates()[7]
    translation = translate(template)
    assert translation.family == "chatml" and translation.default_system == "You are a helpful assistant."
    # Ollama adds SYSTEM when a request has none: that reproduces the template's default.
    rendered = ollama_render(translation.go_template, VERIFY_CONVERSATIONS[0], translation.default_system)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_gemma3_folds_the_system_prompt_into_the_first_user_turn():
    translation = translate(GEMMA3, bos="<bos>")
    assert translation.family == "gemma3" and translation.system_handling == "turn"
    rendered = ollama_render(translation.go_template, VERIFY_CONVERSATIONS[1], None)
    assert rendered.startswith(
        "<start_of_turn>user\nYou are a pirate.\nAnswer briefly.\n\nWhat is the capital"
    )
    assert not rendered.startswith("<bos>")  # BOS comes from the tokenizer, not the template
    assert {"<start_of_turn>", "<end_of_turn>"} <= set(translation.turn_markers)


def test_command_r_translates_with_its_turn_tokens():
    translation = translate(COMMAND_R, bos="<BOS_TOKEN>")
    assert translation.family == "command-r"
    assert "<|END_OF_TURN_TOKEN|>" in translation.turn_markers
    rendered = ollama_render(translation.go_template, VERIFY_CONVERSATIONS[1], None)
    assert rendered == (
        "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are a pirate.\nAnswer briefly.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>What is the capital of France?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    )


def test_bos_is_kept_in_the_template_when_the_tokenizer_does_not_add_it():
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    )
    template += "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    kept = translate(template, adds_bos=False)
    assert ollama_render(kept.go_template, VERIFY_CONVERSATIONS[0], None).startswith("<s><|user|>")
    stripped = translate(template, adds_bos=True)
    assert ollama_render(stripped.go_template, VERIFY_CONVERSATIONS[0], None).startswith("<|user|>")


def test_untranslatable_templates_are_refused_never_written_as_prompt():
    # The system prompt goes into the last user turn: no per-transition glue reproduces that.
    last_user = (
        "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
        "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}[INST] "
        "{% if loop.last and sys %}{{ sys }}\n\n{% endif %}{{ m['content'] }}[/INST]{% else %}{{ m['content'] }}"
        "</s>{% endif %}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="could not be translated"):
        translate(last_user)
    # Contents that do not appear verbatim (upper-cased): nothing can be derived.
    with pytest.raises(ChatTemplateError, match="verbatim"):
        translate("{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}")


GOLDEN_CASES = {
    "chatml": ("corpus", 6),
    "qwen": ("corpus", 7),
    "llama3": ("corpus", 22),
    "mistral": ("corpus", 10),
    "llama2": ("corpus", 12),
    "gemma": ("corpus", 21),
    "gemma3": ("inline", GEMMA3),
    "phi-3": ("corpus", 29),
    "zephyr": ("corpus", 2),
    "command-r": ("inline", COMMAND_R),
    "alpaca": ("corpus", 19),
    "granite-derived": ("corpus", 23),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden_modelfiles_per_family(case: str, tmp_path: Path):
    kind, source = GOLDEN_CASES[case]
    if kind == "corpus":
        if not (CORPUS / "templates.jsonl").is_file():
            pytest.skip(f"the Ollama template corpus is not at {CORPUS}")
        template = corpus_templates()[int(source)][1]
    else:
        template = str(source)
    translation = translate(template)
    spec = spec_from_translation(translation, ["</s>"], {"temperature": 0.2, "num_ctx": 4096})
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "model.Modelfile"
    write_modelfile(target, gguf, spec, f"{case} golden")
    _, problems = parse_modelfile(target)
    assert problems == []
    golden = GOLDEN / f"{case}.Modelfile"
    if os.environ.get("EDGE_EXPORT_UPDATE_GOLDEN") == "1":
        golden.write_text(target.read_text(), newline="\n")
    assert target.read_text() == golden.read_text(), f"regenerate with EDGE_EXPORT_UPDATE_GOLDEN=1: {golden}"


def test_modelfile_command_needs_one_existing_input(tmp_path: Path):
    from tests.conftest import run_cli

    neither = run_cli("modelfile")
    assert neither.returncode == 2 and "exactly one of --gguf" in neither.stderr
    missing = run_cli("modelfile", "--gguf", str(tmp_path / "absent.gguf"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    bad = run_cli("modelfile", "--gguf", str(tmp_path / "bad.gguf"))
    assert bad.returncode == 2 and "not a readable GGUF" in bad.stderr and "Traceback" not in bad.stderr
