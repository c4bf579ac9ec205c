"""The profiles a command was asked for, looked up in the built-in registry and the user's files."""

from __future__ import annotations

from exporter.core.errors import InputError
from exporter.inputs.options import ProfileOptions
from quant_profiles import ProfileError, ProfileRegistry, QuantProfile, builtin_profiles, load_profile_file


def resolve_profiles(options: ProfileOptions) -> tuple[ProfileRegistry, list[QuantProfile]]:
    """The registry (built-in plus the user's files) and the requested profiles, without duplicates."""
    try:
        registry = builtin_profiles().with_files(options.files)
        profiles = [registry.get(name) for name in options.names]
    except ProfileError as exc:
        raise InputError(
            f"{exc}. See `edge-export profiles`; a profile file follows the schema of quant_profiles/."
        ) from exc
    return registry, list({p.name: p for p in profiles}.values())


def requested_profiles(
    options: ProfileOptions, allow_none: bool = False
) -> tuple[ProfileRegistry, list[QuantProfile]]:
    """resolve_profiles for a command that quantizes: at least one profile must be named (unless
    `allow_none`: --fit makes one), and --profile-file with no --profile asks for the file's profiles."""
    registry, profiles = resolve_profiles(options)
    if not profiles and options.files and not allow_none:
        profiles = [load_profile_file(f) for f in options.files]
    if not profiles and not allow_none:
        raise InputError(
            "No --profile given. Name at least one, e.g. --profile Q4_K_M (see `edge-export profiles`)."
        )
    return registry, profiles
