"""The dialects of the files edge-export reads, and the one it writes.

transformers 4.4x–4.57 and 5.x, and PEFT 0.13–0.21, write the same facts in different shapes:

- rope: `rope_theta` + `rope_scaling` (4.x; Gemma-2/3 add `rope_local_base_freq`) or `rope_parameters`
  (5.x: {rope_theta, rope_type, …}, or one such dict per layer type, as Gemma-3 writes);
- the weights' dtype: `torch_dtype` (4.4x–4.55) or `dtype` (4.56 on, and 5.x);
- the tokenizer class: `TokenizersBackend` (5.x, for every fast tokenizer) exists only in 5.x;
- extra special tokens: `additional_special_tokens` (a list, 4.x), `extra_special_tokens` (a dict of
  named tokens in 4.x, a plain list in 5.x);
- the chat template: in tokenizer_config.json (4.3x–4.4x), chat_template.jinja (4.5x, 5.x) or
  chat_template.json (processors);
- modules_to_save copies in an adapter's state dict (PEFT): `<m>.modules_to_save.weight` (with or without
  the adapter name), `<m>.original_module.weight` (the untouched base copy), and, with
  `ensure_weight_tying`/saved embedding layers, the plain `<m>.weight`.

Reading functions return one meaning whichever version wrote the file; `portable_config` and
`portable_tokenizer_config` write the merged folder so that both majors and the vendored converter read it
alike (checked by the tests in environments of both majors).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.chat_probes import render_either_content

# Tokenizer classes only transformers 5 knows, and the class both majors load the same files with.
TRANSFORMERS5_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class Rope:
    """Rotary position settings as the model computes them."""

    theta: float | None
    scaling: dict[str, Any] | None = None  # rope_type and its parameters; None for plain rope
    local_theta: float | None = None  # the sliding-window layers' base (Gemma-2/3), when it differs


def _scaling(params: dict[str, Any]) -> dict[str, Any] | None:
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = kind
    return scaling


def read_rope(config: dict[str, Any]) -> Rope:
    """The rope of a config.json written by transformers 4 or 5 (text_config for multimodal models)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params:
        if all(isinstance(v, dict) for v in params.values()):  # one entry per layer type
            full = params.get("full_attention") or next(iter(params.values()))
            local = params.get("sliding_attention")
            local_theta = local.get("rope_theta") if local else None
            return Rope(full.get("rope_theta"), _scaling(full), local_theta)
        return Rope(params.get("rope_theta"), _scaling(params))
    scaling = config.get("rope_scaling")
    return Rope(
        config.get("rope_theta"),
        _scaling(scaling) if isinstance(scaling, dict) else None,
        config.get("rope_local_base_freq"),
    )


def read_dtype(config: dict[str, Any]) -> str | None:
    """The weights' dtype a config.json declares (`dtype`, or the older `torch_dtype`)."""
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


def portable_config(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """config.json for the merged folder: the same model to transformers 4 and 5 and to the converter.

    Both dtype keys are written. A rope given only as `rope_parameters` (5.x) also gets the 4.x keys
    (rope_theta, rope_scaling, rope_local_base_freq), which 5.x ignores when rope_parameters is present:
    without them transformers 4 falls back to its default rope_theta and computes a different model.
    """
    written = {**config, "dtype": dtype, "torch_dtype": dtype}
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params and "rope_theta" not in config:
        rope = read_rope(config)
        if rope.theta is not None:
            written["rope_theta"] = rope.theta
        if rope.scaling is not None:
            written["rope_scaling"] = rope.scaling
        if rope.local_theta is not None:
            written["rope_local_base_freq"] = rope.local_theta
    if isinstance(config.get("text_config"), dict):  # multimodal models keep the language model's here
        written["text_config"] = portable_config(config["text_config"], dtype)
    return written


def special_token_list(tokenizer_config: dict[str, Any]) -> list[str]:
    """The additional special tokens, whether written as a 4.x list, a 4.x dict or a 5.x list."""
    tokens: list[str] = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = tokenizer_config.get(key)
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        for item in items:
            text = item.get("content") if isinstance(item, dict) else item
            if isinstance(text, str) and text not in tokens:
                tokens.append(text)
    return tokens


def portable_tokenizer_config(tokenizer_config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json that transformers 4 and 5 load as the same tokenizer.

    `TokenizersBackend` becomes `PreTrainedTokenizerFast` (5.x's alias of the same class), and a 5.x list
    of `extra_special_tokens` becomes 4.x's `additional_special_tokens` (which 5.x also reads); a 4.x dict
    of named extra tokens is kept as it is.
    """
    written = dict(tokenizer_config)
    name = written.get("tokenizer_class")
    if name in TRANSFORMERS5_TOKENIZER_CLASSES:
        written["tokenizer_class"] = TRANSFORMERS5_TOKENIZER_CLASSES[name]
    extra = written.get("extra_special_tokens")
    if isinstance(extra, list):
        del written["extra_special_tokens"]
        written["additional_special_tokens"] = special_token_list(tokenizer_config)
    return written


def read_chat_template(folder: Path, include_processor: bool = True) -> str | list[Any] | None:
    """The chat template a tokenizer folder carries, wherever its writer put it.

    As transformers looks: chat_template.jinja, then tokenizer_config.json's `chat_template`, then (a
    processor's) chat_template.json. A list is the named-template form ([{"name": …, "template": …}]).
    """
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    sources = ["tokenizer_config.json"] + (["chat_template.json"] if include_processor else [])
    for name in sources:
        path = folder / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if value:
            return value  # type: ignore[no-any-return]
    return None


def quiet_transformers() -> None:
    """transformers 5 draws a progress bar per model load, and PEFT trips a v6 deprecation warning on
    every adapter: neither belongs in the command's output."""
    import warnings

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """A chat rendered by the tokenizer's template, text content given as typed parts to a template that
    only reads those (converters.chat_probes.render_either_content)."""

    def render(chat: list[dict[str, Any]]) -> str:
        return str(
            tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        )

    return render_either_content(render, messages)


def chat_token_ids(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of a rendered chat, the same in both majors (5.x's apply_chat_template returns a dict)."""
    text = render_chat(tokenizer, messages, add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# PEFT's key shapes for a module kept in full (modules_to_save), adapter name optional:
#   <m>.modules_to_save[.<adapter>].<param>   the trained copy
#   <m>.original_module[.<adapter>].<param>   the untouched base copy (PEFT 0.21 saves it beside)
_SAVED_COPY = re.compile(r"^(?P<module>.+?)\.modules_to_save(?:\.[^.]+)?\.(?P<param>[^.]+)$")
_ORIGINAL_COPY = re.compile(r"^(?P<module>.+?)\.original_module(?:\.[^.]+)?\.(?P<param>[^.]+)$")


@dataclass(frozen=True)
class FullTensorKey:
    """What a non-LoRA key of an adapter's state dict is, in the base model's names."""

    name: str  # the base tensor it stands for, e.g. lm_head.weight
    kind: str  # "trained copy" (modules_to_save), "original copy" (the base's), "plain" (a full tensor)


def classify_full_key(key: str) -> FullTensorKey:
    """Name the base tensor a full (non-LoRA) adapter tensor stands for, in every PEFT layout."""
    key = key.replace(".base_layer.", ".").replace(".token_adapter.", ".")
    match = _SAVED_COPY.match(key)
    if match:
        return FullTensorKey(f"{match.group('module')}.{match.group('param')}", "trained copy")
    match = _ORIGINAL_COPY.match(key)
    if match:
        return FullTensorKey(f"{match.group('module')}.{match.group('param')}", "original copy")
    return FullTensorKey(key, "plain")
