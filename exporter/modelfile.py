"""Ollama Modelfiles for the exported GGUFs: FROM the exact file, the chat template, stops, parameters.

This module knows the ChatML family (the demo model's), verified against the model's own Jinja
template on probe conversations. For other templates it writes no TEMPLATE and says so loudly:
Ollama then falls back to matching the GGUF's embedded template itself.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.atomic import atomic_target
from exporter.errors import InputError, StageError
from exporter.modelfile_check import parse_modelfile

log = logging.getLogger(__name__)

CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
# generation_config.json key -> Ollama PARAMETER name
GENERATION_PARAMETERS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repeat_penalty",
}
PROBE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


@dataclass(frozen=True)
class ChatSpec:
    """What a Modelfile needs to reproduce the model's chat formatting."""

    family: str | None  # "chatml", or None when not translated
    go_template: str | None
    default_system: str | None
    stops: tuple[str, ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    note: str | None = None


def render_chatml(messages: list[dict[str, str]], default_system: str | None) -> str:
    """What CHATML_GO_TEMPLATE renders in Ollama, given SYSTEM = default_system."""
    if default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return body + "<|im_start|>assistant\n"


def chat_spec(model_dir: Path) -> ChatSpec:
    """Derive the chat template translation, stops and parameters from a merged HF folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    template = tokenizer.chat_template
    stops = _stop_strings(tokenizer, model_dir)
    parameters = _generation_parameters(model_dir)

    def untranslated(why: str) -> ChatSpec:
        return ChatSpec(None, None, None, tuple(stops), parameters, note=why)

    if not template:
        return untranslated("the tokenizer has no chat template; the Modelfile has no TEMPLATE")
    if "<|im_start|>" not in template or "<|im_end|>" not in template:
        return untranslated(
            "the chat template is not ChatML; this version writes no TEMPLATE for it, so Ollama "
            "will match the GGUF's embedded template itself"
        )

    def jinja(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    default_system = None
    first = jinja(PROBE_CONVERSATIONS[0])
    if first.startswith("<|im_start|>system\n"):
        default_system = first[len("<|im_start|>system\n") :].split("<|im_end|>", 1)[0]
    # A template that writes {{ bos_token }} itself renders it; Ollama's renders leave BOS to the tokenizer.
    bos = tokenizer.bos_token if tokenizer.bos_token and "bos_token" in template else ""
    for messages in PROBE_CONVERSATIONS:
        expected = jinja(messages)
        ours = render_chatml(messages, default_system)
        if expected.removeprefix(bos) != ours:
            return untranslated(
                "the ChatML-like template renders differently from standard ChatML; no TEMPLATE "
                "written, Ollama will match the GGUF's embedded template itself"
            )
    for marker in ("<|im_start|>", "<|im_end|>"):
        if marker not in stops:
            stops.append(marker)
    return ChatSpec("chatml", CHATML_GO_TEMPLATE, default_system, tuple(stops), parameters)


def _stop_strings(tokenizer: Any, model_dir: Path) -> list[str]:
    stops: list[str] = []
    eos_ids: list[int] = []
    generation_config = model_dir / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        eos_ids.append(tokenizer.eos_token_id)
    for token_id in eos_ids:
        text = tokenizer.convert_ids_to_tokens(int(token_id))
        if text and text not in stops:
            stops.append(text)
    return stops


def _generation_parameters(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return {ollama: config[key] for key, ollama in GENERATION_PARAMETERS.items() if key in config}


def _quoted(value: str, what: str, target: Path) -> str:
    if '"""' in value:
        raise InputError(
            f'The {what} for {target} contains \'"""\', which an Ollama Modelfile cannot hold (it has no '
            "escapes). Remove the triple quote from the chat template or system prompt and export again."
        )
    return f'"""{value}"""'


def model_license(model_dir: Path) -> str | None:
    """The text of the model's license file (carried through the merge from the base), if any."""
    from exporter.merge import LICENSE_PATTERN

    for entry in sorted(model_dir.iterdir()):
        if entry.is_file() and LICENSE_PATTERN.match(entry.name) and entry.name.upper().startswith("LICEN"):
            return entry.read_text(encoding="utf-8", errors="replace").strip("\n")
    return None


def write_modelfile(
    target: Path,
    gguf: Path,
    spec: ChatSpec,
    header_comment: str,
    license_text: str | None = None,
    adapter: Path | None = None,
) -> None:
    """Write a Modelfile whose FROM is the GGUF's path relative to the Modelfile (atomically, LF endings).

    With `adapter`, an ADAPTER line names a GGUF LoRA that Ollama applies on top of FROM.
    """
    relative = Path(gguf).relative_to(target.parent) if gguf.is_relative_to(target.parent) else gguf
    lines = [
        f"# {header_comment}",
        f"FROM ./{relative.as_posix()}" if not relative.is_absolute() else f"FROM {relative}",
    ]
    if adapter is not None:
        relative = adapter.relative_to(target.parent) if adapter.is_relative_to(target.parent) else adapter
        lines.append(
            f"ADAPTER ./{relative.as_posix()}" if not relative.is_absolute() else f"ADAPTER {relative}"
        )
    if spec.go_template:
        lines.append(f"TEMPLATE {_quoted(spec.go_template, 'chat template', target)}")
    if spec.default_system:
        lines.append(f"SYSTEM {_quoted(spec.default_system, 'default system prompt', target)}")
    if license_text:
        lines.append(f"LICENSE {_quoted(license_text, 'license text', target)}")
    lines += [f'PARAMETER stop "{stop}"' for stop in spec.stops]
    lines += [f"PARAMETER {name} {value}" for name, value in spec.parameters.items()]
    with atomic_target(target) as partial:
        partial.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
        _, problems = parse_modelfile(partial)
        if problems:
            raise StageError(
                f"The Modelfile written for {target} does not pass validation: {'; '.join(problems)}"
            )
