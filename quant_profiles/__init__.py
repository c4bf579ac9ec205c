"""Quantization profiles: data files validated by a schema, looked up by name or alias.

Each profile is one TOML file in this package (or a user's file given with --profile-file). The
schema is strict: unknown keys, unknown llama.cpp file types and unknown tensor types are errors
that name the file and the field.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# llama_ftype values of the pinned llama.cpp revision (include/llama.h). F32 is ALL_F32 there.
LLAMA_FTYPES: dict[str, int] = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "IQ2_XXS": 19,
    "IQ2_XS": 20,
    "Q2_K_S": 21,
    "IQ3_XS": 22,
    "IQ3_XXS": 23,
    "IQ1_S": 24,
    "IQ4_NL": 25,
    "IQ3_S": 26,
    "IQ3_M": 27,
    "IQ2_S": 28,
    "IQ2_M": 29,
    "IQ4_XS": 30,
    "IQ1_M": 31,
    "BF16": 32,
    "TQ1_0": 36,
    "TQ2_0": 37,
}
# ggml_type values of the same revision, for per-tensor overrides.
GGML_TYPES: dict[str, int] = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q5_0": 6,
    "Q5_1": 7,
    "Q8_0": 8,
    "Q2_K": 10,
    "Q3_K": 11,
    "Q4_K": 12,
    "Q5_K": 13,
    "Q6_K": 14,
    "IQ2_XXS": 16,
    "IQ2_XS": 17,
    "IQ3_XXS": 18,
    "IQ1_S": 19,
    "IQ4_NL": 20,
    "IQ3_S": 21,
    "IQ2_S": 22,
    "IQ4_XS": 23,
    "IQ1_M": 29,
    "BF16": 30,
}
# File types llama.cpp refuses to produce without an importance matrix.
IMATRIX_REQUIRED = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "Q2_K_S"})


class ProfileError(ValueError):
    """A profile file is invalid, or a profile name is unknown."""


def _ggml_type(value: str) -> str:
    name = value.upper()
    if name not in GGML_TYPES:
        raise ValueError(f"unknown tensor type {value!r}; valid: {', '.join(GGML_TYPES)}")
    return name


class TensorOverrides(BaseModel):
    """Types that replace the file type's choice for particular tensors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    # GGUF tensor-name regular expression -> ggml type, e.g. {"ffn_down" = "Q6_K"}.
    tensor_types: dict[str, str] = Field(default_factory=dict)

    @field_validator("output_tensor_type", "token_embedding_type")
    @classmethod
    def _check_type(cls, value: str | None) -> str | None:
        return None if value is None else _ggml_type(value)

    @field_validator("tensor_types")
    @classmethod
    def _check_patterns(cls, value: dict[str, str]) -> dict[str, str]:
        checked = {}
        for pattern, type_name in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from exc
            checked[pattern] = _ggml_type(type_name)
        return checked


class QualityGates(BaseModel):
    """Limits the quality check applies to an artifact of this profile (vs the unmerged reference)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_mean_kld: float = Field(gt=0)
    min_top1: float = Field(gt=0, le=1)


class QuantProfile(BaseModel):
    """One quantization profile: a llama.cpp file type plus overrides and quality gates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    ftype: str
    description: str
    bits_per_weight: float = Field(gt=0, le=32)
    aliases: tuple[str, ...] = ()
    requires_imatrix: bool = False
    overrides: TensorOverrides = Field(default_factory=TensorOverrides)
    gates: QualityGates

    @field_validator("ftype")
    @classmethod
    def _check_ftype(cls, value: str) -> str:
        name = value.upper()
        if name not in LLAMA_FTYPES:
            raise ValueError(f"unknown llama.cpp file type {value!r}; valid: {', '.join(LLAMA_FTYPES)}")
        return name

    @property
    def ftype_id(self) -> int:
        """The llama_ftype number passed to llama_model_quantize."""
        return LLAMA_FTYPES[self.ftype]

    def is_source(self, source_ftype: str) -> bool:
        """The converter's own output (F16, or BF16 for a bfloat16 model) needs no quantization step."""
        return self.ftype == source_ftype and not self.overrides.tensor_types

    @property
    def needs_imatrix(self) -> bool:
        return self.requires_imatrix or self.ftype in IMATRIX_REQUIRED


def load_profile_file(path: Path) -> QuantProfile:
    """Read and validate one profile file; errors name the file and the field."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ProfileError(f"profile file {path} does not exist") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile file {path} is not valid TOML: {exc}") from exc
    try:
        return QuantProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '(top level)'}': {err['msg']}"
            for err in exc.errors()
        )
        raise ProfileError(f"profile file {path} is invalid: {problems}") from exc


@dataclass(frozen=True)
class ProfileRegistry:
    """Profiles by canonical name; lookup is case-insensitive and accepts aliases."""

    profiles: tuple[QuantProfile, ...]

    @classmethod
    def build(cls, profiles: Iterable[QuantProfile]) -> ProfileRegistry:
        seen: dict[str, str] = {}
        ordered = []
        for profile in profiles:
            for key in (profile.name, *profile.aliases):
                folded = key.casefold()
                if folded in seen:
                    raise ProfileError(
                        f"profile name or alias {key!r} of {profile.name} is already used by {seen[folded]}"
                    )
                seen[folded] = profile.name
            ordered.append(profile)
        return cls(tuple(ordered))

    def names(self) -> list[str]:
        return [p.name for p in self.profiles]

    def get(self, name: str) -> QuantProfile:
        folded = name.strip().casefold()
        for profile in self.profiles:
            if folded == profile.name.casefold() or folded in (a.casefold() for a in profile.aliases):
                return profile
        raise ProfileError(f"unknown profile {name!r}; valid profiles: {', '.join(self.names())}")

    def with_files(self, paths: Iterable[Path]) -> ProfileRegistry:
        """This registry plus users' profile files (which may not reuse a name)."""
        return ProfileRegistry.build([*self.profiles, *(load_profile_file(p) for p in paths)])


def builtin_profiles() -> ProfileRegistry:
    """Every profile shipped in this package, ordered by bits per weight."""
    folder = resources.files(__name__)
    loaded = []
    for entry in folder.iterdir():
        if entry.name.endswith(".toml"):
            with resources.as_file(entry) as path:
                loaded.append(load_profile_file(Path(path)))
    loaded.sort(key=lambda p: (p.bits_per_weight, p.name))
    return ProfileRegistry.build(loaded)
