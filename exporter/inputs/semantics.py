"""What the pinned llama.cpp computes of a config.json: settings its graph does not implement are refused
before any work, settings that only differ past a length are reported (exporter/data/llama_cpp_semantics.toml).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from exporter.core.errors import InputError
from exporter.inputs.dialects import read_rope

TABLE = "llama_cpp_semantics.toml"
NULL = "null"  # TOML has no null: a key absent or null


@dataclass(frozen=True)
class Rule:
    """One row of the table."""

    models: tuple[str, ...]
    setting: str  # the row's "field"
    default: Any
    why: str
    fix: str
    supported: tuple[Any, ...] | None = None
    equals: str | None = None
    when: dict[str, Any] = field(default_factory=dict)
    severity: str = "refuse"
    only_beyond: str = ""
    hidden_per_head_layers: tuple[int, ...] = ()


@cache
def rules() -> tuple[Rule, ...]:
    """The table's rows, checked for shape (a malformed row is a bug in the package, not in the input)."""
    rows = tomllib.loads(resources.files("exporter.data").joinpath(TABLE).read_text())["rule"]
    parsed = []
    for row in rows:
        rule = Rule(
            tuple(row["models"]),
            row["field"],
            row["default"],
            row["why"],
            row["fix"],
            tuple(row["supported"]) if "supported" in row else None,
            row.get("equals"),
            dict(row.get("when", {})),
            row.get("severity", "refuse"),
            row.get("only_beyond", ""),
            tuple(row.get("hidden_per_head_layers", ())),
        )
        if (rule.supported is None) == (rule.equals is None) or rule.severity not in ("refuse", "warn"):
            raise ValueError(f"{TABLE}: row {row['field']} of {rule.models} needs one of supported / equals")
        parsed.append(rule)
    return tuple(parsed)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: a multimodal config's text_config, else the config itself."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) and inner.get("model_type") else config


def value_of(config: dict[str, Any], name: str, default: Any) -> Any:
    """A field's value as the model computes with it (`default` where the config leaves it out)."""
    if not name.startswith("rope."):
        value = config.get(name)
        return default if value is None and name not in config else value
    rope = read_rope(config)
    key = name.removeprefix("rope.")
    if key == "theta":
        return rope.theta if rope.theta is not None else default
    if key == "type":
        return (rope.scaling or {}).get("rope_type", "default")
    if key.startswith("sliding_attention."):
        params = config.get("rope_parameters") or {}
        local = params.get("sliding_attention") if isinstance(params, dict) else None
        kind = (local or {}).get("rope_type", "default") if isinstance(local, dict) else "default"
        return kind if key.endswith(".type") else default
    return (rope.scaling or {}).get(key, default)


def expected(rule: Rule, config: dict[str, Any]) -> Any:
    """The value an `equals` row needs, computed from the rest of the config."""
    heads = config.get("num_attention_heads") or 1
    layers = int(config.get("num_hidden_layers") or 0)
    if rule.equals == "head_dim":
        if layers in rule.hidden_per_head_layers:
            return config.get("hidden_size", 0) // heads
        return config.get("head_dim") or config.get("hidden_size", 0) // heads
    if rule.equals == "yarn_attention_factor":
        factor = float(value_of(config, "rope.factor", 1.0) or 1.0)
        return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    if rule.equals == "gemma3_layer_types":
        return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    if rule.equals == "alternating_sliding":
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    raise ValueError(f"{TABLE}: unknown equals {rule.equals!r}")


def _same(value: Any, wanted: Any) -> bool:
    if wanted == NULL:
        return value is None
    if isinstance(wanted, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return math.isclose(value, wanted, rel_tol=1e-6)
    return bool(value == wanted)


def holds(rule: Rule, config: dict[str, Any]) -> bool:
    """Whether the config asks for what llama.cpp computes (rows whose `when` does not apply hold)."""
    for name, wanted in rule.when.items():
        if not _same(value_of(config, name, None), wanted):
            return True
    default = None if rule.default == NULL else rule.default
    value = value_of(config, rule.setting, default)
    if rule.equals is not None:
        if value is None and rule.equals.endswith(("layer_types", "sliding")):
            return True  # no pattern given: the model's own, which llama.cpp implements
        if value is None and rule.equals == "yarn_attention_factor":
            return True
        return _same(value, expected(rule, config))
    return any(_same(value, wanted) for wanted in rule.supported or ())


def check_semantics(base_dir: Path, config: dict[str, Any], commit: str) -> list[str]:
    """Refuse a config the pinned llama.cpp would compute as another model; the notes of settings that only
    differ past a length."""
    inner = text_config(config)
    model_type = str(inner.get("model_type") or config.get("model_type"))
    notes = []
    for rule in sorted(rules(), key=lambda r: r.severity != "refuse"):  # refusals first
        if model_type not in rule.models or holds(rule, inner):
            continue
        default = None if rule.default == NULL else rule.default
        value = value_of(inner, rule.setting, default)
        asked = f"{rule.setting} = {value!r}" + (
            " (transformers' default: the key is absent)"
            if rule.setting not in inner and not rule.setting.startswith("rope.")
            else ""
        )
        if rule.severity == "refuse":
            raise InputError(
                f"{base_dir / 'config.json'} ({model_type}) computes with {asked}, which llama.cpp "
                f"{commit[:9]} does not: {rule.why}. The GGUF would be another model than the one you "
                f"trained, so the export is refused before any work. {rule.fix[0].upper()}{rule.fix[1:]}."
            )
        notes.append(
            f"{model_type} {asked}: {rule.why}; the GGUF computes the same model up to {rule.only_beyond}, "
            f"not past it ({rule.fix})"
        )
    return notes
