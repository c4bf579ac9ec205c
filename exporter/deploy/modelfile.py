"""Ollama Modelfiles for the exported GGUFs: FROM the exact file, the chat template, stops, parameters.

The TEMPLATE is the model's own Jinja chat template translated by exporter.deploy.chat_template and
verified on probe conversations; a template that cannot be translated exactly stops the export
with a clear error. Stops are every end-of-sequence / end-of-turn token of the tokenizer and
generation_config plus the template's turn markers; PARAMETERs come from generation_config.json,
num_ctx from the model's context length (capped at DEFAULT_NUM_CTX unless asked otherwise).
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.core.atomic import atomic_target
from exporter.core.errors import InputError, StageError
from exporter.deploy.chat_template import (
    CANONICAL_TEMPLATES,
    ChatTemplateError,
    TemplateTranslation,
    jinja_render,
    translate_chat_template,
)
from exporter.deploy.modelfile_check import parse_modelfile
from exporter.inputs.base_config import read_base_config
from exporter.inputs.dialects import render_chat
from exporter.inputs.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CHATML_GO_TEMPLATE = CANONICAL_TEMPLATES["chatml"]
RAW_PROMPT_TEMPLATE = "{{ .Prompt }}"
# Context length written as num_ctx when the model's is larger: memory for the KV cache grows with it.
DEFAULT_NUM_CTX = 4096
# generation_config.json key -> Ollama PARAMETER name
GENERATION_PARAMETERS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repeat_penalty",
}


@dataclass(frozen=True)
class ChatSpec:
    """What a Modelfile needs to reproduce the model's chat formatting."""

    family: str | None  # "chatml", "llama3", …, "derived"; None when the model has no chat template
    go_template: str | None
    default_system: str | None
    stops: tuple[str, ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    system_handling: str | None = None  # "turn", "folded" or "dropped" (see TemplateTranslation)
    verified_conversations: int = 0


def adds_bos(tokenizer: Any) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == tokenizer.bos_token_id


def chat_spec(model_dir: Path, num_ctx: int | None = None, tokenizer: Any = None) -> ChatSpec:
    """Translate and verify the chat template of an HF folder (whose tokenizer may be given loaded);
    its stops and parameters. Raises ChatTemplateError when no Go template renders like it."""
    spec, error = chat_spec_or_error(model_dir, num_ctx, tokenizer)
    if error is not None:
        raise error
    return spec


def chat_spec_or_error(
    model_dir: Path, num_ctx: int | None = None, tokenizer: Any = None
) -> tuple[ChatSpec, ChatTemplateError | None]:
    """As chat_spec; a template without a Go translation gives a spec without TEMPLATE and the reason."""
    if tokenizer is None:
        tokenizer = load_tokenizer(model_dir)
    stops = _stop_strings(tokenizer, _eos_ids_from_generation_config(model_dir))
    parameters = _generation_parameters(model_dir)
    parameters.update(_num_ctx(_context_length(model_dir), num_ctx))
    template = tokenizer.chat_template
    if not template:
        return _raw_prompt_spec(stops, parameters), None

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return render_chat(tokenizer, messages, generation)

    special = {
        *tokenizer.all_special_tokens,
        *(t.content for t in tokenizer.added_tokens_decoder.values() if t.special),
    }
    try:
        translation = translate_chat_template(
            template,
            render,
            tokenizer.bos_token,
            adds_bos(tokenizer),
            special,
            source=f"The chat template of {model_dir}",
        )
    except ChatTemplateError as exc:
        return ChatSpec("untranslated", None, None, tuple(stops), parameters), exc
    return spec_from_translation(translation, stops, parameters), None


def _raw_prompt_spec(stops: list[str], parameters: dict[str, Any]) -> ChatSpec:
    note = (
        "the model has no chat template, so its Modelfile passes prompts through unchanged (TEMPLATE {{ .Prompt }}): "
        "right for a completion model; for chat, give the adapter folder a chat template and export again"
    )
    return ChatSpec("none", RAW_PROMPT_TEMPLATE, None, tuple(stops), parameters, note=note)


def spec_from_translation(
    translation: TemplateTranslation, stops: list[str], parameters: dict[str, Any]
) -> ChatSpec:
    """The Modelfile spec of a verified translation: its turn markers join the stops."""
    for marker in translation.turn_markers:
        if marker not in stops:
            stops.append(marker)
    note = None
    if translation.system_handling == "dropped":
        note = "the chat template ignores system messages, and so does the Modelfile's TEMPLATE"
    elif translation.system_handling == "folded":
        note = (
            "the chat template refuses system messages; the Modelfile's TEMPLATE puts a system prompt before the "
            "first user message"
        )
    return ChatSpec(
        translation.family,
        translation.go_template,
        translation.default_system,
        tuple(stops),
        parameters,
        note=note,
        system_handling=translation.system_handling,
        verified_conversations=translation.verified_conversations,
    )


def chat_spec_from_gguf(gguf: Path, num_ctx: int | None = None) -> ChatSpec:
    """The same translation, stops and num_ctx from what a GGUF file carries (its tokenizer.* metadata)."""
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(str(gguf))
    except Exception as exc:  # noqa: BLE001 - any parse failure means the file is not a readable GGUF
        raise InputError(f"{gguf} is not a readable GGUF file ({exc}). Pass a .gguf model file.") from exc

    def value(key: str) -> Any:
        found = reader.fields.get(key)
        if found is None:
            return None
        if found.types and found.types[0] == GGUFValueType.ARRAY:
            return (
                [found.contents(i) for i in range(len(found.data))]
                if key != "tokenizer.ggml.tokens"
                else None
            )
        return found.contents()

    if value("general.type") == "adapter":
        raise InputError(f"{gguf} is a LoRA adapter GGUF, not a model. Pass the model's .gguf file.")
    tokens_field = reader.fields.get("tokenizer.ggml.tokens")
    types_field = reader.fields.get("tokenizer.ggml.token_type")
    if tokens_field is None:
        raise InputError(f"{gguf} carries no vocabulary (tokenizer.ggml.tokens). Pass a complete model GGUF.")
    tokens = [bytes(tokens_field.parts[i]).decode("utf-8", errors="replace") for i in tokens_field.data]
    token_types = [int(types_field.parts[i][0]) for i in types_field.data] if types_field else []
    # llama.cpp token types: 3 = control, 4 = user-defined (added tokens)
    special = {tokens[i] for i, kind in enumerate(token_types) if kind in (3, 4)}

    def token(key: str) -> str | None:
        index = value(key)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    stops = [
        t for t in (eos, token("tokenizer.ggml.eot_token_id"), token("tokenizer.ggml.eom_token_id")) if t
    ]
    stops = list(dict.fromkeys(stops))
    architecture = value("general.architecture")
    parameters = _num_ctx(value(f"{architecture}.context_length"), num_ctx)
    template = value("tokenizer.chat_template")
    if not template:
        return _raw_prompt_spec(stops, parameters)
    render = jinja_render(str(template), {"bos_token": bos or "", "eos_token": eos or ""})
    adds_bos = bool(value("tokenizer.ggml.add_bos_token")) if bos else False
    translation = translate_chat_template(
        str(template), render, bos, adds_bos, special, source=f"The chat template embedded in {gguf}"
    )
    return spec_from_translation(translation, stops, parameters)


def _num_ctx(context_length: Any, requested: int | None) -> dict[str, Any]:
    if requested is not None:
        if requested < 1:
            raise InputError(f"--num-ctx must be a positive number of tokens, not {requested}.")
        return {"num_ctx": requested}
    if isinstance(context_length, int) and context_length > 0:
        return {"num_ctx": min(context_length, DEFAULT_NUM_CTX)}
    return {}


def _context_length(model_dir: Path) -> int | None:
    if not (model_dir / "config.json").is_file():
        return None
    config = read_base_config(model_dir)
    config = config.get("text_config", config)
    for key in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def _eos_ids_from_generation_config(model_dir: Path) -> list[int]:
    generation_config = model_dir / "generation_config.json"
    if not generation_config.is_file():
        return []
    eos = json.loads(generation_config.read_text()).get("eos_token_id")
    return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)] if eos is not None else []


def _stop_strings(tokenizer: Any, eos_ids: Iterable[int]) -> list[str]:
    """Every end-of-sequence token: generation_config's eos_token_id (one or a list) and the tokenizer's."""
    stops: list[str] = []
    ids = list(eos_ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    for token_id in ids:
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
    from exporter.inputs.adapter import LICENSE_PATTERN

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
    projector: Path | None = None,
) -> None:
    """Write a Modelfile whose FROM is the GGUF's path relative to the Modelfile (atomically, LF endings).

    With `adapter`, an ADAPTER line names a GGUF LoRA that Ollama applies on top of FROM. With `projector`
    (a vision-language model's mmproj GGUF), a second FROM names it: Ollama's importer tells it from the
    model by its metadata (general.type mmproj) and serves it with llama-server --mmproj. Each line of
    `header_comment` becomes a comment line (wrapped).
    """
    comments = [f"# {line}" for part in header_comment.splitlines() for line in textwrap.wrap(part, 110)]
    lines = [*comments, f"FROM {_relative(gguf, target)}"]
    if projector is not None:
        lines.append(f"FROM {_relative(projector, target)}")
    if adapter is not None:
        lines.append(f"ADAPTER {_relative(adapter, target)}")
    if spec.go_template:
        lines.append(f"TEMPLATE {_quoted(spec.go_template, 'chat template', target)}")
    if spec.default_system:
        lines.append(f"SYSTEM {_quoted(spec.default_system, 'default system prompt', target)}")
    if license_text:
        lines.append(f"LICENSE {_quoted(license_text, 'license text', target)}")
    for stop in spec.stops:
        if '"' in stop or "\n" in stop:
            raise InputError(
                f"The stop string {stop!r} for {target} contains a quote or a line break, which a Modelfile "
                "PARAMETER cannot hold. Rename that token in the tokenizer, or drop it from the stops, and export again."
            )
    lines += [f'PARAMETER stop "{stop}"' for stop in spec.stops]
    lines += [f"PARAMETER {name} {value}" for name, value in spec.parameters.items()]
    with atomic_target(target) as partial:
        partial.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
        _, problems = parse_modelfile(partial)
        if problems:
            raise StageError(
                f"The Modelfile written for {target} does not pass validation: {'; '.join(problems)}"
            )


def _relative(path: Path, modelfile: Path) -> str:
    """A path as a Modelfile names it: ./relative to the Modelfile's folder where it lies below it."""
    relative = path.relative_to(modelfile.parent) if path.is_relative_to(modelfile.parent) else path
    return str(relative) if relative.is_absolute() else f"./{relative.as_posix()}"
