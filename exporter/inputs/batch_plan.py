"""A batch plan (`edge-export batch PLAN.toml`): which adapters to export, on which bases, to which profiles.

    out = "batch-out"                      # relative paths are relative to the plan file
    profiles = ["Q4_K_M", "Q8_0"]          # every export's, unless one overrides them
    eval_data = "eval.jsonl"               # check, eval_data, eval_tokens, gates, dtype: defaults,
    eval_tokens = "auto"                   # overridable by an entry
    [bases.smollm2]
    path = "models/smollm2"
    [[adapters]]                           # one merged export per matching folder
    path = "adapters/customer-*"
    [[adapters]]                           # one merged export of several adapters, weighted
    name = "blend"
    merge = [{ path = "adapters/a", weight = 0.7 }, { path = "adapters/b", weight = 0.3 }]
    [[runtime_lora]]                       # one base per profile shared by GGUF LoRA adapters
    name = "smollm2-runtime"
    adapters = ["adapters/customer-*"]

The file is validated before any work: unknown keys, wrong types, paths or globs that match nothing,
names used twice and unknown bases are refused with the file and line.
"""

from __future__ import annotations

import glob
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from exporter.core.errors import InputError
from exporter.core.units import parse_size
from exporter.inputs.evaldata import check_eval_tokens
from exporter.inputs.options import DEFAULT_FIT_TRIALS, FitOptions, parse_gate_overrides


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Settings(_Strict):
    """What a plan sets for every export and an entry may override."""

    profiles: list[str] | None = None
    check: bool | None = None
    eval_data: str | None = None
    eval_tokens: int | str | None = None
    gates: list[str] | None = None
    dtype: str | None = None


class _Part(_Strict):
    path: str
    weight: float = 1.0


class _Adapter(_Settings):
    path: str | None = None
    merge: list[_Part] | None = None
    name: str | None = None
    base: str | None = None
    fit: str | None = None  # merge-quantize --fit SIZE
    fit_bpw: float | None = None  # --fit-bpw BITS
    fit_trials: int = DEFAULT_FIT_TRIALS


class _RuntimeGroup(_Settings):
    name: str
    adapters: list[str]
    base: str | None = None


class _Base(_Strict):
    path: str


class _PlanFile(_Settings):
    out: str
    profile_files: list[str] = []
    bases: dict[str, _Base]
    adapters: list[_Adapter] = []
    runtime_lora: list[_RuntimeGroup] = []


@dataclass(frozen=True)
class PlanJob:
    """One export of the plan: merged (one or several weighted adapters) or a runtime-LoRA group."""

    kind: str  # "merged" | "runtime"
    name: str  # its folder under the plan's out, and the model name in file names
    adapters: tuple[tuple[Path, float], ...]
    base: Path
    profiles: tuple[str, ...]
    check: bool
    eval_data: Path | None
    gates: tuple[str, ...]
    dtype: str | None
    eval_tokens: str = "auto"
    fit: FitOptions | None = None


@dataclass(frozen=True)
class Plan:
    source: Path
    out: Path
    profile_files: tuple[Path, ...]
    jobs: tuple[PlanJob, ...]


def locate(text: str, loc: tuple[Any, ...]) -> int:
    """The line of a value in the plan's TOML: `loc` as pydantic reports it, e.g. ("adapters", 2, "path")."""
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if line.lstrip().startswith("[")]
    keys = [str(part) for part in loc]
    begin, rest = None, keys
    if len(keys) > 1 and keys[0] in ("adapters", "runtime_lora") and keys[1].isdigit():
        header = re.compile(rf"^\s*\[\[\s*{keys[0]}\s*\]\]")
        starts = [i for i in headers if header.match(lines[i])]
        begin = starts[int(keys[1])] if int(keys[1]) < len(starts) else None
        rest = keys[2:]
    elif len(keys) > 1 and keys[0] == "bases":
        header = re.compile(rf"^\s*\[\s*bases\.\"?{re.escape(keys[1])}\"?\s*\]")
        begin = next((i for i in headers if header.match(lines[i])), None)
        rest = keys[2:]
    if begin is None:  # a top-level key: before the first table
        first, end = 0, headers[0] if headers else len(lines)
    else:
        first, end = begin, next((i for i in headers if i > begin), len(lines))
    if rest:
        key = re.compile(rf"^\s*\"?{re.escape(rest[0])}\"?\s*=")
        found = next((i for i in range(first, end) if key.match(lines[i])), None)
        if found is not None:
            return found + 1
    return first + 1


def load_plan(path: Path) -> Plan:
    """The plan at `path`, validated, with its globs expanded; or an InputError naming the file and line."""
    if not path.is_file():
        raise InputError(
            f"The plan {path} does not exist. Pass a TOML file (see README, `edge-export batch`)."
        )
    text = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML: {exc}. Fix the syntax there.") from exc
    try:
        plan = _PlanFile.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise InputError(
            f"{path}:{locate(text, tuple(error['loc']))}: {where}: {error['msg']}. "
            "Fix or remove it (the keys a plan takes are listed in the README's batch section)."
        ) from exc
    return _resolve(plan, path, text)


def _resolve(plan: _PlanFile, path: Path, text: str) -> Plan:
    root = path.parent
    checker = _Checker(path, text)
    bases = {}
    for name, entry_base in plan.bases.items():
        bases[name] = checker.folder(root / entry_base.path, ("bases", name, "path"), "base model")
    jobs: list[PlanJob] = []
    for i, entry in enumerate(plan.adapters):
        base = checker.base(entry.base, bases, ("adapters", i, "base"))
        if (entry.path is None) == (entry.merge is None):
            raise checker.error(("adapters", i), "give either path (a folder or a glob) or merge (a list)")
        if entry.merge is not None:
            parts = tuple(
                (checker.folder(root / part.path, ("adapters", i, "merge"), "adapter"), part.weight)
                for part in entry.merge
            )
            name = entry.name or parts[0][0].name
            jobs.append(_job(plan, entry, "merged", name, parts, base, checker, ("adapters", i)))
            continue
        assert entry.path is not None
        matches = checker.matches(root, entry.path, ("adapters", i, "path"))
        if entry.name and len(matches) > 1:
            raise checker.error(
                ("adapters", i, "name"), f"the glob matches {len(matches)} folders; drop name"
            )
        for folder in matches:
            name = entry.name or folder.name
            jobs.append(_job(plan, entry, "merged", name, ((folder, 1.0),), base, checker, ("adapters", i)))
    for i, group in enumerate(plan.runtime_lora):
        base = checker.base(group.base, bases, ("runtime_lora", i, "base"))
        folders = [
            f
            for pattern in group.adapters
            for f in checker.matches(root, pattern, ("runtime_lora", i, "adapters"))
        ]
        if group.dtype is not None:
            raise checker.error(("runtime_lora", i, "dtype"), "a runtime-LoRA base is not merged; drop dtype")
        adapters = tuple((folder, 1.0) for folder in folders)
        jobs.append(_job(plan, group, "runtime", group.name, adapters, base, checker, ("runtime_lora", i)))
    names = [job.name for job in jobs]
    for job in jobs:
        if names.count(job.name) > 1:
            raise InputError(
                f"{path}: two exports are named {job.name!r} (each gets the folder <out>/{job.name}). Give one "
                "of them another name."
            )
    if not jobs:
        raise InputError(f"{path}: the plan has no [[adapters]] and no [[runtime_lora]]; add one.")
    profile_files = tuple(
        checker.file(root / f, ("profile_files",), "profile file") for f in plan.profile_files
    )
    return Plan(path, (root / plan.out).resolve(), profile_files, tuple(jobs))


def _job(
    plan: _PlanFile,
    entry: _Settings,
    kind: str,
    name: str,
    adapters: tuple[tuple[Path, float], ...],
    base: Path,
    checker: _Checker,
    loc: tuple[Any, ...],
) -> PlanJob:
    def setting(key: str) -> Any:
        own = getattr(entry, key)
        return own if own is not None else getattr(plan, key)

    eval_data = setting("eval_data")
    eval_tokens = str(setting("eval_tokens") or "auto")
    try:
        check_eval_tokens(eval_tokens)
    except InputError as exc:
        raise checker.error((*loc, "eval_tokens"), str(exc).replace("--eval-tokens", "eval_tokens")) from exc
    gates = tuple(setting("gates") or ())
    try:
        parse_gate_overrides(gates)
    except InputError as exc:
        raise checker.error((*loc, "gates"), str(exc).replace("--gate", "gate")) from exc
    root = checker.path.parent
    return PlanJob(
        kind,
        re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-_") or "model",
        adapters,
        base,
        tuple(setting("profiles") or ("Q4_K_M",)),
        True if setting("check") is None else setting("check"),
        checker.file(root / eval_data, (*loc, "eval_data"), "evaluation data") if eval_data else None,
        gates,
        setting("dtype"),
        eval_tokens,
        _fit(entry, checker, loc) if isinstance(entry, _Adapter) else None,
    )


def _fit(entry: _Adapter, checker: _Checker, loc: tuple[Any, ...]) -> FitOptions | None:
    """An entry's fit = "2.5GB" or fit_bpw = 4.3, as --fit / --fit-bpw."""
    if entry.fit is None and entry.fit_bpw is None:
        return None
    try:
        if entry.fit is not None:
            return FitOptions(entry.fit, parse_size(entry.fit), entry.fit_bpw, entry.fit_trials)
        return FitOptions(f"{entry.fit_bpw:g}", None, entry.fit_bpw, entry.fit_trials)
    except (ValueError, InputError) as exc:
        message = str(exc).replace("--fit-bpw", "fit_bpw").replace("--fit", "fit")
        raise checker.error((*loc, "fit"), message) from exc


class _Checker:
    """Checks of the plan's paths, each failure naming the plan file and the line."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    def error(self, loc: tuple[Any, ...], what: str) -> InputError:
        where = ".".join(str(part) for part in loc)
        return InputError(f"{self.path}:{locate(self.text, loc)}: {where}: {what.rstrip('.')}.")

    def folder(self, folder: Path, loc: tuple[Any, ...], what: str) -> Path:
        if not folder.is_dir():
            raise self.error(loc, f"the {what} folder {folder} does not exist; fix the path")
        return folder.resolve()

    def file(self, file: Path, loc: tuple[Any, ...], what: str) -> Path:
        if not file.is_file():
            raise self.error(loc, f"the {what} {file} does not exist; fix the path")
        return file.resolve()

    def matches(self, root: Path, pattern: str, loc: tuple[Any, ...]) -> list[Path]:
        found = sorted(Path(p).resolve() for p in glob.glob(str(root / pattern)) if Path(p).is_dir())
        if not found:
            raise self.error(loc, f"{pattern!r} matches no folder (relative to {root}); fix the path or glob")
        return found

    def base(self, name: str | None, bases: dict[str, Path], loc: tuple[Any, ...]) -> Path:
        if name is None:
            if len(bases) != 1:
                raise self.error(loc[:2], f'the plan has {len(bases)} bases; say which with base = "NAME"')
            return next(iter(bases.values()))
        if name not in bases:
            raise self.error(
                loc, f"no base named {name!r}; the plan's bases are {', '.join(bases) or 'none'}"
            )
        return bases[name]
