"""What each adapter_config.json key does to the merged weights: the table in data/adapter_config_keys.toml.

A key is merged exactly, has no effect on the weights, or is refused; a key the table does not know is
refused when set, because it may change the weights. Merge and runtime-LoRA paths read adapters through
this one check.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from exporter.core.errors import InputError

EFFECTS = ("none", "implemented", "refused")
SECTIONS = {"LORA": ("common", "lora"), "IA3": ("common", "ia3")}


@dataclass(frozen=True)
class KeyRule:
    """One row of the table."""

    key: str
    effect: str
    why: str
    accept: tuple[Any, ...] | None = None  # values that are fine (None: any, for "none"/"implemented")
    fix: str = ""

    def refuses(self, value: Any) -> bool:
        if value is None:
            return False
        if self.accept is not None:
            return value not in self.accept
        return self.effect == "refused" and is_set(value)


def is_set(value: Any) -> bool:
    """A value that asks for something: not null, false, "" or an empty list or table."""
    return value not in (None, False, "") and value != {} and value != []


@cache
def key_table(peft_type: str) -> dict[str, KeyRule]:
    """The rules for one adapter type (LORA, IA3), read from the package's data file."""
    raw = tomllib.loads(
        resources.files("exporter").joinpath("data/adapter_config_keys.toml").read_text(encoding="utf-8")
    )
    table: dict[str, KeyRule] = {}
    for section in SECTIONS[peft_type]:
        for key, row in raw[section].items():
            if row["effect"] not in EFFECTS or key in table:
                raise ValueError(f"adapter_config_keys.toml: bad or duplicate row {section}.{key}")
            accept = tuple(row["accept"]) if "accept" in row else None
            table[key] = KeyRule(key, row["effect"], row["why"], accept, row.get("fix", ""))
    return table


def check_adapter_keys(config_file: Path, config: dict[str, Any], peft_type: str) -> list[str]:
    """Refuse keys whose effect the merge does not compute; return the keys that have no effect but are set.

    Types other than LORA and IA3 are not checked here: the merge refuses those by type.
    """
    if peft_type not in SECTIONS:
        return []
    if peft_type == "LORA":
        check_lora_values(config_file, config)
    table = key_table(peft_type)
    for key, value in config.items():
        rule = table.get(key)
        if rule is None:
            if is_set(value):
                raise InputError(
                    f"{config_file} sets {key} = {value!r}, which edge-export does not know (a newer PEFT, or "
                    "another tool, wrote it). It may change the adapter's weights, so the adapter is refused "
                    "rather than merged without it. If you know it only affects training, remove it from "
                    f"{config_file.name} and run again."
                )
            continue
        if rule.refuses(value) and rule.accept is not None:
            raise InputError(
                f"{config_file} sets {key} = {value!r}, which the merge cannot reproduce (it accepts "
                f"{', '.join(repr(v) for v in rule.accept)}). {rule.fix}."
            )
        if rule.refuses(value):
            raise InputError(
                f"{config_file} sets {key} = {value!r}. {rule.why[0].upper()}{rule.why[1:]}: the merge cannot "
                f"compute that, and leaving it out would give a model other than the one you trained. {rule.fix}."
            )
    return sorted(k for k, v in config.items() if k in table and table[k].effect == "none" and is_set(v))


def check_lora_values(config_file: Path, config: dict[str, Any]) -> None:
    """The values the merge computes with: every rank a positive whole number, every alpha a number, and
    BD-LoRA's block count a positive whole number (a zero rank would divide by zero in the scaling)."""

    def refuse(key: str, value: Any, wanted: str) -> InputError:
        return InputError(
            f"{config_file} sets {key} = {value!r}, but {wanted}. The file is damaged or was edited by hand: "
            "re-save the adapter with PEFT (save_pretrained), or correct the value to the one it was trained with."
        )

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and value == value

    if "r" in config and not whole(config["r"]):
        raise refuse("r", config["r"], "a LoRA's rank is a whole number of at least 1")
    if "lora_alpha" in config and not number(config["lora_alpha"]):
        raise refuse("lora_alpha", config["lora_alpha"], "lora_alpha is a number")
    for key, ok, wanted in (
        ("rank_pattern", whole, "ranks are whole numbers of at least 1"),
        ("alpha_pattern", number, "alphas are numbers"),
    ):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise refuse(key, patterns, f"{key} maps module names to values")
        for module, value in patterns.items():
            if not ok(value):
                raise refuse(f"{key}[{module!r}]", value, wanted)
    bdlora = config.get("use_bdlora")
    if is_set(bdlora):
        if not isinstance(bdlora, dict):
            raise refuse(
                "use_bdlora", bdlora, "use_bdlora is PEFT's BdLoraConfig (nblocks, target_modules_bd_a/_b)"
            )
        if "nblocks" in bdlora and not whole(bdlora["nblocks"]):
            raise refuse(
                "use_bdlora.nblocks", bdlora["nblocks"], "the block count is a whole number of at least 1"
            )
