"""Which template the Ollama version a Modelfile is written for (exporter.inputs.ollama_version) renders with.

Ollama's rendering changed at 0.30 (server/routes.go selectedTemplateSource, server/images.go
shouldPreferChatTemplate): a RENDERER/PARSER named in the Modelfile wins; then harmony (gpt-oss); then
the Modelfile's Go TEMPLATE, unless the GGUF's own Jinja template has more capabilities (tools,
thinking), in which case llama-server renders the GGUF's `tokenizer.chat_template` with llama.cpp's
C++ Jinja engine. Before 0.30 only the Go TEMPLATE is rendered. From 0.34.1 a Modelfile with ADAPTER
is refused. `choose_template` decides per model and target which of these renders the chat, checks
that it renders like transformers, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from converters.chat_probes import template_capabilities
from converters.template_parity import TemplateParity
from exporter.core.errors import InputError
from exporter.inputs.ollama_version import CURRENT_OLLAMA, OllamaTarget

# Built-in renderers (model/renderers/renderer.go). None is written: none has been verified against a
# model's own template here (they are Go code inside Ollama, outside what the tests can run).
VERIFIED_RENDERERS: dict[str, str] = {}


@dataclass(frozen=True)
class TemplateChoice:
    """What renders chats in Ollama for one export, and why.

    source: "go_template" (the Modelfile's TEMPLATE), "gguf_chat_template" (llama-server renders the
    GGUF's Jinja template) or "harmony" (Ollama's gpt-oss renderer, chosen by Ollama itself).
    """

    ollama_version: str
    source: str
    reason: str
    capabilities: tuple[str, ...]
    write_template: bool  # whether the Modelfile carries the verified Go TEMPLATE
    llama_server_note: str | None = None  # where llama-server's rendering differs, when Ollama's does not

    def to_json(self) -> dict[str, object]:
        return {
            "ollama_version": self.ollama_version,
            "renders_with": self.source,
            "reason": self.reason,
            "template_capabilities": list(self.capabilities),
            "modelfile_template": self.write_template,
            "llama_server_note": self.llama_server_note,
        }


def _is_harmony(template: str) -> bool:
    return "<|channel|>" in template and "<|start|>" in template and "<|message|>" in template


def _parity_problem(parity: TemplateParity | None, source: str) -> str | None:
    if parity is None:
        return f"{source} was not checked in llama.cpp's Jinja engine"
    if parity.passed:
        return None
    return "; ".join(parity.problems())


def choose_template(
    target: OllamaTarget,
    template: str | None,
    translation_error: str | None,
    parity: TemplateParity | None,
    source: str,
) -> TemplateChoice:
    """Decide what Ollama `target` will render chats with, or refuse (InputError) when that renderer would
    not render like transformers. `translation_error` is why no Go TEMPLATE could be derived (None when one
    was, verified); `parity` is the GGUF template in llama.cpp's engine against transformers."""
    if not template:
        return TemplateChoice(target.text, "go_template", "the model has no chat template", (), True)
    capabilities = template_capabilities(template)
    described = " and ".join(capabilities)
    if parity is not None and parity.parse_error is not None:
        raise InputError(
            f"{source}: llama.cpp's C++ Jinja engine cannot parse it ({parity.parse_error}), so llama-server (which "
            "Ollama 0.30 and later run every GGUF model through) refuses the model with --jinja. Rewrite the template "
            "without that construct (chat_template.jinja next to the adapter) and export again."
        )
    if not target.renders_gguf_jinja:
        return _go_template_only(target, capabilities, translation_error, parity, source)
    problem = _parity_problem(parity, source)
    if _is_harmony(template):
        return TemplateChoice(
            target.text,
            "harmony",
            f"Ollama {target.text} renders gpt-oss models with its built-in harmony renderer, whatever the "
            f"Modelfile says; llama-server renders the GGUF's template ({'verified' if problem is None else problem})",
            capabilities,
            translation_error is None,
        )
    if capabilities:
        if problem is not None:
            raise InputError(
                f"{source} has {described}, so Ollama {target.text} renders it from the GGUF with llama.cpp's "
                f"C++ Jinja engine, and there it does not render like transformers: {problem}. Fix the template "
                "(put it in chat_template.jinja next to the adapter) and export again, or write Modelfiles for an "
                "older Ollama with --ollama-version 0.29 and a template without tools and thinking."
            )
        return TemplateChoice(
            target.text,
            "gguf_chat_template",
            f"the model's template has {described}, more than a Modelfile TEMPLATE carries, so Ollama "
            f"{target.text} prefers the GGUF's own template (rendered by llama-server, {parity.summary() if parity else ''}); "
            "the Modelfile's TEMPLATE only serves plain turns where Ollama is told to use Go templates",
            capabilities,
            translation_error is None,
        )
    if translation_error is not None:
        raise InputError(translation_error)
    llama_server = "llama-server renders the GGUF's template: " + (
        parity.summary() if problem is None and parity else f"NOT like transformers: {problem}"
    )
    return TemplateChoice(
        target.text,
        "go_template",
        f"the model's template has no tools and no thinking, so Ollama {target.text} renders the Modelfile's "
        f"TEMPLATE (verified identical); {llama_server}",
        capabilities,
        True,
        _llama_server_note(parity),
    )


def _go_template_only(
    target: OllamaTarget,
    capabilities: tuple[str, ...],
    translation_error: str | None,
    parity: TemplateParity | None,
    source: str,
) -> TemplateChoice:
    """Before 0.30 Ollama renders the Modelfile's TEMPLATE only, which carries plain turns."""
    described = " and ".join(capabilities)
    if capabilities:
        raise InputError(
            f"{source} has {described}, which Ollama {target.text} renders only through the Modelfile's Go "
            "TEMPLATE, and edge-export's translation carries plain turns only: tool definitions, tool calls or "
            "thinking would be formatted unlike training. Write the Modelfiles for Ollama 0.30 or later "
            f"(--ollama-version {CURRENT_OLLAMA}, the default), where Ollama renders the GGUF's own template, or "
            "export with a chat template without tools and thinking."
        )
    if translation_error is not None:
        raise InputError(translation_error)
    return TemplateChoice(
        target.text,
        "go_template",
        f"Ollama {target.text} renders only the Modelfile's TEMPLATE; it renders plain turns and system "
        "prompts exactly like the model's template",
        capabilities,
        True,
        _llama_server_note(parity),
    )


def _llama_server_note(parity: TemplateParity | None) -> str | None:
    if parity is None or parity.passed:
        return None
    return f"llama-server (--jinja) renders the GGUF's template unlike transformers: {'; '.join(parity.problems())}"
