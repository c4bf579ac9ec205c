"""chat and parity: the chat template translated for Ollama and verified, checked in llama.cpp's own
Jinja engine, the renderer Ollama will use for the target version chosen; and the tokenizer of the
GGUF compared with the Hugging Face tokenizer it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from converters.llama_tools import LlamaToolsMissing, locate_llama_tools
from converters.stop_tokens import turn_terminator
from converters.template_parity import ProbeResult, TemplateParity, compare_probes, hf_tokenizer_render
from exporter.core.errors import EnvironmentSetupError, StageError
from exporter.core.version import __version__
from exporter.deploy.modelfile import ChatSpec, adds_bos, chat_spec_or_error
from exporter.deploy.ollama_targets import TemplateChoice, choose_template
from exporter.engine.run import Run
from exporter.engine.stage_keys import chat_key, parity_key
from exporter.inputs.dialects import render_chat
from exporter.inputs.ollama_version import OllamaTarget
from exporter.inputs.tokenizer import load_tokenizer
from exporter.quality.tokenizer_parity import PARITY_CHECKS, ParityReport, check_tokenizer_parity


@dataclass(frozen=True)
class ChatRecord:
    """The verified translation (Ollama TEMPLATE, stops, parameters), the Jinja template it came from,
    the template in llama.cpp's engine against transformers, and what the target Ollama renders with."""

    spec: ChatSpec
    template: str | None
    key: str
    choice: TemplateChoice
    jinja: TemplateParity | None
    terminator: str | None = None  # the token that closes an assistant turn in the template
    stop_prompt: str | None = None  # a one-question chat, rendered, for the "does it stop" generation


def template_parity_of(tokenizer: Any) -> TemplateParity:
    """The tokenizer's chat template rendered by llama.cpp's engine (as llama-server does) and by
    transformers on every probe conversation."""
    try:
        tools = locate_llama_tools()
    except LlamaToolsMissing as exc:
        raise EnvironmentSetupError(str(exc)) from exc
    source = {
        "template": tokenizer.chat_template,
        "bos_token": tokenizer.bos_token or "",
        "eos_token": tokenizer.eos_token or "",
    }
    bos = tokenizer.bos_token or ""
    return compare_probes(tokenizer.chat_template, hf_tokenizer_render(tokenizer), source, tools, bos)


def parity_to_json(parity: TemplateParity) -> dict[str, Any]:
    return {**asdict(parity), "passed": parity.passed}


def parity_from_json(data: dict[str, Any]) -> TemplateParity:
    results = tuple(ProbeResult(**r) for r in data["results"])
    return TemplateParity(data["llama_cpp_commit"], tuple(data["capabilities"]), data["parse_error"], results)


def chat_stage(
    run: Run, merge_key: str, model_dir: Path, target: OllamaTarget, name: str = "chat"
) -> ChatRecord:
    """The chat-template translation of a merged folder, its check in llama.cpp's Jinja engine and what
    Ollama `target` renders with (cached: loading the tokenizer and rendering costs seconds)."""
    tools_commit = locate_llama_tools_commit()

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        meta.update(resolve_chat(model_dir, target), what="chat template")

    key = chat_key(merge_key, __version__, target.text, tools_commit)
    entry = run.stage(name, "chat", key, produce)
    return chat_record(entry.meta, key)


def resolve_chat(model_dir: Path, target: OllamaTarget) -> dict[str, Any]:
    """The translation, the llama.cpp check and the choice for an HF folder's chat template, as JSON;
    raises InputError when what Ollama `target` would render with does not render like transformers."""
    tokenizer = load_tokenizer(model_dir)
    spec, error = chat_spec_or_error(model_dir, tokenizer=tokenizer)
    template = tokenizer.chat_template or None
    jinja = template_parity_of(tokenizer) if template else None
    source = f"The chat template of {model_dir}"
    choice = choose_template(target, template, None if error is None else str(error), jinja, source)
    if not choice.write_template:
        spec = replace(spec, go_template=None)
    return {
        "spec": asdict(spec),
        "chat_template": template,
        "choice": asdict(choice),
        "jinja": None if jinja is None else parity_to_json(jinja),
        **stop_probe(tokenizer),
    }


def stop_probe(tokenizer: Any) -> dict[str, str | None]:
    """The template's turn terminator and a rendered one-question chat (without a leading BOS: the
    runtime adds it) for the "does it stop" generation."""
    if not tokenizer.chat_template:
        return {"terminator": None, "stop_prompt": None}

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return render_chat(tokenizer, messages, generation)

    special = {
        *tokenizer.all_special_tokens,
        *(t.content for t in tokenizer.added_tokens_decoder.values() if t.special),
    }
    prompt = render([{"role": "user", "content": "What is the capital of France?"}], True)
    bos = tokenizer.bos_token or ""
    if bos and adds_bos(tokenizer) and prompt.startswith(bos):
        prompt = prompt[len(bos) :]
    return {"terminator": turn_terminator(render, special), "stop_prompt": prompt}


def chat_record(meta: dict[str, Any], key: str = "") -> ChatRecord:
    spec, choice, jinja = meta["spec"], meta["choice"], meta["jinja"]
    return ChatRecord(
        ChatSpec(**{**spec, "stops": tuple(spec["stops"])}),
        meta["chat_template"],
        key,
        TemplateChoice(**{**choice, "capabilities": tuple(choice["capabilities"])}),
        None if jinja is None else parity_from_json(jinja),
        meta.get("terminator"),
        meta.get("stop_prompt"),
    )


def report_template_choice(run: Run, chat: ChatRecord) -> None:
    """Say what the target Ollama renders chats with, and why; and the llama.cpp engine's verdict."""
    choice = chat.choice
    run.report(f"Ollama {choice.ollama_version} renders chats with {choice.source}: {choice.reason}")
    if chat.jinja is not None:
        run.report(f"llama.cpp's Jinja engine: {chat.jinja.summary()}")
    if choice.llama_server_note:
        run.report(f"note: {choice.llama_server_note}")


def locate_llama_tools_commit() -> str:
    """The llama.cpp commit and renderer build of the tools; a missing build is a broken installation."""
    try:
        tools = locate_llama_tools()
        return f"{tools.commit}/{tools.renderer.name}"
    except LlamaToolsMissing as exc:
        raise EnvironmentSetupError(str(exc)) from exc


def parity_stage(
    run: Run, convert_key: str, model_dir: Path, gguf: Path, name: str = "parity", new_from: int | None = None
) -> ParityReport:
    """Tokenizer parity of a merged folder and its 16-bit GGUF (every quantization carries the same
    vocabulary, so one check covers them all). An added token with an id from `new_from` on (the base
    tokenizer's size: a token the adapter added) that llama.cpp loses fails the export."""

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        meta.update(parity=check_tokenizer_parity(model_dir, gguf).to_json(), what="tokenizer parity")

    entry = run.stage(name, "parity", parity_key(convert_key, __version__, PARITY_CHECKS), produce)
    recorded = {k: v for k, v in entry.meta["parity"].items() if k != "passed"}
    report = ParityReport(**recorded)
    error = report.added_token_error(new_from)
    if error:
        raise StageError(f"{gguf.name}: {error}")
    return report
