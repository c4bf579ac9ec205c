"""Translate a model's Jinja chat template into an Ollama Go template, and prove the translation.

The translation is derived, not guessed: the Jinja template is rendered on probe conversations
whose contents are unique sentinels, and the text between consecutive messages ("glue") is read
off for every role transition (start→system, system→user, user→assistant, assistant→user, …),
with the generation prompt after the last message. A Go template that writes that glue before each
message reproduces every template whose output is "glue + content" per message: ChatML (Qwen's
default system prompt included), Llama-3, Mistral/[INST], Llama-2 (<<SYS>>), Gemma (system folded
into the first user turn, as Gemma-3 does), Phi-3, Zephyr, Command-R, Alpaca-style and most others.
Well-known families are written as their idiomatic Ollama template when that renders identically.

Every translation is verified: realistic conversations (with and without a system message,
several turns, generation prompt open) are rendered through the Jinja template and through the Go
template (exporter.deploy.gotemplate evaluates it as Ollama would, with the Modelfile's SYSTEM added
when a conversation has none) and must give identical strings. A template that cannot be
translated raises ChatTemplateError; we never fall back to `{{ .Prompt }}` silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from converters.chat_probes import render_either_content
from converters.errors import InputError
from exporter.deploy.gotemplate import GoTemplateError, render_go_template

Message = dict[str, str]
# render(messages, add_generation_prompt) -> the Jinja template's text
JinjaRender = Callable[[list[Message], bool], str]

ROLES = ("system", "user", "assistant")
START = ""  # the "previous role" before the first message

# Idiomatic Ollama templates, used when they render exactly like the derived translation.
CANONICAL_TEMPLATES = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "phi-3": "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
}
# Family names by the markers their templates write, most specific first.
FAMILY_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("command-r", ("<|START_OF_TURN_TOKEN|>",)),
    ("llama3", ("<|start_header_id|>", "<|eot_id|>")),
    ("chatml", ("<|im_start|>", "<|im_end|>")),
    ("gemma", ("<start_of_turn>",)),
    ("phi-3", ("<|end|>", "<|user|>")),
    ("zephyr", ("<|user|>", "<|assistant|>")),
    ("llama2", ("<<SYS>>", "[INST]")),
    ("mistral", ("[INST]", "[/INST]")),
    ("alpaca", ("### Instruction", "### Response")),
)
# Turn markers that are plain text in these families' vocabularies: stop strings all the same.
TEXT_MARKERS = {"mistral": ("[INST]", "[/INST]"), "llama2": ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")}
# The conversations every translation must reproduce exactly.
VERIFY_CONVERSATIONS: list[list[Message]] = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [
        {"role": "system", "content": "You are a pirate.\nAnswer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4, matey."},
        {"role": "user", "content": "And 3+3?\nShow your work."},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Thanks!"},
    ],
]
# Role sequences rendered with sentinel contents to read off the glue.
_PROBE_SHAPES: tuple[tuple[str, ...], ...] = (
    ("user",),
    ("system", "user"),
    ("user", "assistant", "user"),
    ("system", "user", "assistant", "user"),
    ("user", "assistant"),
    ("user", "assistant", "system", "user"),
)


class ChatTemplateError(InputError):
    """The chat template cannot be translated into an Ollama template that renders identically."""


@dataclass(frozen=True)
class TemplateTranslation:
    """A verified Ollama translation of a Jinja chat template."""

    family: str  # "chatml", "llama3", …, or "derived" for a template outside the known families
    go_template: str
    default_system: str | None
    # "turn": system messages have their own glue; "folded": the Jinja template refuses them and ours puts
    # them before the first user message; "dropped": the Jinja template ignores them, and so does ours.
    system_handling: str
    turn_markers: tuple[str, ...]  # special tokens (or text headers) that open or close turns: stop strings
    verified_conversations: int


def _sentinel(index: int) -> str:
    return f"QxContent{index}Qx"  # mixed case: a template that changes case is caught


def _strip_bos(text: str, bos: str) -> str:
    return text[len(bos) :] if bos and text.startswith(bos) else text


def _render(render: JinjaRender, messages: list[Message], generation: bool) -> str | None:
    try:
        return render(messages, generation)
    except Exception:  # noqa: BLE001 - a template may refuse a conversation (raise_exception): that is data
        return None


def _read_glue(text: str, contents: list[str]) -> list[str] | None:
    """The text before each content and after the last one, or None when a content is not there verbatim."""
    pieces, position = [], 0
    for content in contents:
        found = text.find(content, position)
        if found < 0 or text.count(content) != 1:
            return None
        pieces.append(text[position:found])
        position = found + len(content)
    pieces.append(text[position:])
    return pieces


@dataclass
class _Glue:
    before: dict[tuple[str, str], str]  # (previous role, role) -> text written before the message
    after: dict[str, str]  # last role -> text after it (generation prompt open)
    conflicts: list[str]
    dropped: set[str]  # roles whose messages the template renders without their content


def _derive_glue(render: JinjaRender, bos: str) -> _Glue:
    glue = _Glue({}, {}, [], set())
    for shape in _PROBE_SHAPES:
        contents = [_sentinel(i) for i in range(len(shape))]
        messages = [{"role": r, "content": c} for r, c in zip(shape, contents, strict=True)]
        text = _render(render, messages, True)
        if text is None:
            continue
        pieces = _read_glue(_strip_bos(text, bos), contents)
        if pieces is None:
            if shape == ("system", "user") and text.count(contents[0]) == 0 and text.count(contents[1]) == 1:
                glue.dropped.add("system")
            continue
        previous = START
        for role, piece in zip(shape, pieces, strict=False):
            key = (previous, role)
            if key in glue.before and glue.before[key] != piece:
                glue.conflicts.append(f"{previous or 'start'}→{role}: {glue.before[key]!r} vs {piece!r}")
            glue.before.setdefault(key, piece)
            previous = role
        glue.after.setdefault(shape[-1], pieces[-1])
    return glue


def _default_system(glue: _Glue) -> str | None:
    plain = glue.before.get((START, "user"))
    opening, closing = glue.before.get((START, "system")), glue.before.get(("system", "user"))
    if plain is None or opening is None or closing is None:
        return None
    if len(plain) > len(opening) + len(closing) and plain.startswith(opening) and plain.endswith(closing):
        return plain[len(opening) : len(plain) - len(closing)]
    return None


def _resolve(glue: _Glue, previous: str, role: str) -> str:
    """The glue for a transition; transitions the template never renders borrow the nearest known one."""
    for key in ((previous, role), ("assistant", role), ("user", role), (START, role)):
        if key in glue.before:
            return glue.before[key]
    return ""


def _go_literal(text: str) -> str:
    # Literal text cannot contain "{{" in a Go template; write it as a string action instead.
    return text.replace("{{", '{{ "{{" }}')


def _derived_go_template(glue: _Glue) -> str:
    parts = ['{{ $prev := "" }}{{ range .Messages }}']
    for index, role in enumerate(ROLES):
        parts.append(f'{{{{ {"if" if index == 0 else "else if"} eq .Role "{role}" }}}}')
        by_previous = {previous: _resolve(glue, previous, role) for previous in (START, *ROLES)}
        common = max(set(by_previous.values()), key=list(by_previous.values()).count)
        special = [(p, text) for p, text in by_previous.items() if text != common]
        for position, (previous, text) in enumerate(special):
            parts.append(f'{{{{ {"if" if position == 0 else "else if"} eq $prev "{previous}" }}}}')
            parts.append(_go_literal(text))
        if special:
            parts.append("{{ else }}" + _go_literal(common) + "{{ end }}")
        else:
            parts.append(_go_literal(common))
        parts.append("" if role in glue.dropped else "{{ .Content }}{{ $prev = .Role }}")
    parts.append("{{ end }}{{ end }}")
    endings = {role: glue.after.get(role, glue.after.get("user", "")) for role in ROLES}
    parts.append('{{ if eq $prev "assistant" }}' + _go_literal(endings["assistant"]))
    parts.append('{{ else if eq $prev "system" }}' + _go_literal(endings["system"]))
    parts.append("{{ else }}" + _go_literal(endings["user"]) + "{{ end }}")
    return "".join(parts)


def ollama_render(go_template: str, messages: list[Message], default_system: str | None) -> str:
    """What Ollama renders for a chat request: the Modelfile's SYSTEM is added when the request has none."""
    if default_system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": default_system}, *messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data: dict[str, Any] = {
        "System": system,
        "Prompt": "",
        "Response": "",
        "Tools": None,
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
    }
    return render_go_template(go_template, data)


def _mismatch(go_template: str, render: JinjaRender, bos: str, default_system: str | None) -> str | None:
    """None when the Go template renders every verification conversation like Jinja, else what differs."""
    for messages in VERIFY_CONVERSATIONS:
        expected = _render(render, messages, True)
        if expected is None:
            continue  # a conversation the Jinja template refuses (e.g. a system message) is not compared
        expected = _strip_bos(expected, bos)
        try:
            ours = ollama_render(go_template, messages, default_system)
        except GoTemplateError as exc:
            return f"the Go template cannot be evaluated ({exc})"
        if ours != expected:
            at = next((i for i, (a, b) in enumerate(zip(ours, expected, strict=False)) if a != b), None)
            at = min(len(ours), len(expected)) if at is None else at
            return (
                f"for roles {[m['role'] for m in messages]} the Jinja template renders "
                f"{expected[max(0, at - 30) : at + 40]!r} where ours renders {ours[max(0, at - 30) : at + 40]!r}"
            )
    return None


def _family(rendered: str, system_supported: bool) -> str:
    for family, markers in FAMILY_MARKERS:
        if all(marker in rendered for marker in markers):
            if family == "gemma" and system_supported:
                return "gemma3"
            return family
    return "derived"


def _turn_markers(glue: _Glue, special_tokens: Collection[str], family: str) -> tuple[str, ...]:
    texts = [*glue.before.values(), *glue.after.values()]
    markers: list[str] = [m for m in TEXT_MARKERS.get(family, ()) if any(m in text for text in texts)]
    first_seen = "".join(texts)
    for token in sorted(special_tokens, key=lambda t: (first_seen.find(t), t)):
        if token and any(token in text for text in texts) and token not in markers:
            markers.append(token)
    if not any(token in text for token in special_tokens for text in texts):
        # A plain-text template (Alpaca-style): the headers that open the next user or assistant turn.
        for key in (("assistant", "user"), ("user", "assistant")):
            header = glue.before.get(key, "").strip()
            if header and header not in markers:
                markers.append(header.splitlines()[-1].strip() if "\n" in header else header)
    return tuple(markers)


def translate_chat_template(
    template: str,
    render: JinjaRender,
    bos_token: str | None,
    adds_bos: bool,
    special_tokens: Collection[str] = (),
    source: str = "the chat template",
) -> TemplateTranslation:
    """Translate and verify a Jinja chat template; raise ChatTemplateError when no exact translation exists.

    `render` renders the Jinja template (the tokenizer's apply_chat_template). When the tokenizer adds
    BOS itself and the template writes it too, the template's BOS is left out of ours (Ollama's
    tokenizer adds it), which is also what keeps the prompt from starting with two BOS tokens.
    """
    bos = bos_token if bos_token and adds_bos and "bos_token" in template else ""
    glue = _derive_glue(render, bos)
    if (START, "user") not in glue.before or ("user", "assistant") not in glue.before:
        raise ChatTemplateError(
            f"{source} does not render a plain user/assistant conversation with its messages' text verbatim, so no "
            "Ollama template can be derived from it. Give the model a chat template whose turns are "
            '"header + message + footer" (put it in tokenizer_config.json\'s "chat_template" or chat_template.jinja '
            "next to the adapter) and export again."
        )
    if (START, "system") in glue.before and ("system", "user") in glue.before:
        system_handling = "turn"
    elif "system" in glue.dropped:
        system_handling = "dropped"
    else:
        # The template refuses system messages: ours folds one into the first user turn, as Gemma-3 does.
        system_handling = "folded"
        glue.before[(START, "system")] = glue.before[(START, "user")]
        glue.before[("system", "user")] = "\n\n"
    default_system = _default_system(glue) if system_handling == "turn" else None
    family = _family("".join([*glue.before.values(), *glue.after.values()]), system_handling == "turn")
    candidates = [CANONICAL_TEMPLATES[family]] if family in CANONICAL_TEMPLATES and not glue.dropped else []
    candidates.append(_derived_go_template(glue))
    problem = None
    for go_template in candidates:
        problem = _mismatch(go_template, render, bos, default_system)
        if problem is None:
            verified = sum(_render(render, m, True) is not None for m in VERIFY_CONVERSATIONS)
            return TemplateTranslation(
                family,
                go_template,
                default_system,
                system_handling,
                _turn_markers(glue, special_tokens, family),
                verified,
            )
    conflicts = f" (its glue depends on more than the neighbouring roles: {'; '.join(glue.conflicts)})"
    raise ChatTemplateError(
        f"{source} could not be translated into an Ollama template that renders identically: {problem}"
        f"{conflicts if glue.conflicts else ''}. Ollama would format prompts differently from training and the "
        "model would ramble. Use a chat template of a common family (ChatML, Llama-3, Mistral, Gemma, Phi-3, "
        "Zephyr, Command-R, Alpaca) in tokenizer_config.json or chat_template.jinja and export again."
    )


def jinja_render(template: str, special_tokens: dict[str, str]) -> JinjaRender:
    """Render a template as transformers' apply_chat_template does (for templates read from a GGUF)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages: list[Message], generation: bool) -> str:
        options: dict[str, Any] = {"add_generation_prompt": generation, **special_tokens}

        def rendered(chat: list[dict[str, Any]]) -> str:
            result: Any = render_jinja_template(conversations=[chat], chat_template=template, **options)
            return str(result[0][0])

        return render_either_content(rendered, list(messages))

    return render


def special_token_strings(template: str) -> set[str]:
    """Strings in a template that look like special tokens (<|…|>, <…>, [INST]), for a vocabulary we lack."""
    return set(re.findall(r"(?<!<)<\|?[A-Za-z_/][\w./-]*\|?>(?!>)|\[/?INST\]", template))
