"""A validator for Ollama Modelfiles, following Ollama's parser rules.

Commands (case-insensitive): FROM, ADAPTER, TEMPLATE, SYSTEM, PARAMETER, MESSAGE, LICENSE. `#`
starts a comment only at the beginning of a line. A value is the rest of the line, or "…" on one
line, or \"\"\"…\"\"\" over several lines, with no escapes, so content holding \"\"\" cannot be written.
PARAMETER names are matched case-sensitively and an unknown one is fatal. FROM and ADAPTER paths
are resolved against the Modelfile's folder; a FROM path that does not exist would silently become
a model name to pull, so it is an error here. Line endings must be LF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from converters.gguf_header import read_gguf_metadata

COMMANDS = {"FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "PARAMETER", "MESSAGE", "LICENSE"}
PARAMETERS = {
    "num_ctx",
    "num_predict",
    "num_keep",
    "seed",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "temperature",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "num_batch",
    "num_gpu",
    "num_thread",
    "main_gpu",
    "use_mmap",
}
MESSAGE_ROLES = {"system", "user", "assistant", "tool"}


@dataclass(frozen=True)
class Instruction:
    command: str
    value: str
    line: int


def parse_modelfile(path: Path) -> tuple[list[Instruction], list[str]]:
    """The instructions of a Modelfile and every problem found (empty when it is valid)."""
    raw = path.read_bytes()
    problems: list[str] = []
    if b"\r" in raw:
        problems.append("line endings must be LF, not CRLF or CR")
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    lines = text.split("\n")
    instructions: list[Instruction] = []
    number = 0
    while number < len(lines):
        line = lines[number]
        number += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        command, _, rest = stripped.partition(" ")
        upper = command.upper()
        if upper not in COMMANDS:
            problems.append(f"line {number}: unknown command {command!r}")
            continue
        rest = rest.strip()
        start = number
        if rest.startswith('"""'):
            body = rest[3:]
            while '"""' not in body:
                if number >= len(lines):
                    problems.append(f'line {start}: """ is never closed')
                    body += '"""'
                    break
                body += "\n" + lines[number]
                number += 1
            value, _, trailing = body.partition('"""')
            if trailing.strip():
                problems.append(f'line {number}: text after the closing """')
        elif rest.startswith('"') and upper != "PARAMETER":
            if not (rest.endswith('"') and len(rest) >= 2):
                problems.append(f"line {start}: unterminated quoted value")
            value = rest.strip('"')
        else:
            value = rest
        if not value and upper not in ("SYSTEM", "TEMPLATE"):
            problems.append(f"line {start}: {upper} has no value")
        instructions.append(Instruction(upper, value, start))
    _check_instructions(path, instructions, problems)
    return instructions, problems


def _check_instructions(path: Path, instructions: list[Instruction], problems: list[str]) -> None:
    froms = [i for i in instructions if i.command == "FROM"]
    models = [i for i in froms if not _is_projector(path.parent / i.value)]
    if len(models) != 1 or len(froms) - len(models) > 1:
        problems.append(
            f"there must be exactly one FROM for the model, found {len(models)}, and at most one more for a "
            f"vision model's projector (an mmproj GGUF), found {len(froms) - len(models)}"
        )
    for instruction in instructions:
        if instruction.command in ("FROM", "ADAPTER"):
            target = Path(instruction.value)
            resolved = target if target.is_absolute() else path.parent / target
            looks_like_path = instruction.value.startswith((".", "/", "~")) or instruction.value.endswith(
                ".gguf"
            )
            if (instruction.command == "ADAPTER" or looks_like_path) and not resolved.exists():
                problems.append(
                    f"line {instruction.line}: {instruction.command} {instruction.value} does not exist "
                    f"(resolved against the Modelfile's folder: {resolved})"
                )
        elif instruction.command == "PARAMETER":
            name, _, value = instruction.value.partition(" ")
            if name not in PARAMETERS:
                problems.append(f"line {instruction.line}: unknown PARAMETER {name!r} (Ollama rejects it)")
            elif not value.strip():
                problems.append(f"line {instruction.line}: PARAMETER {name} has no value")
            elif name != "stop" and not re.fullmatch(r"-?\d+(\.\d+)?|true|false", value.strip()):
                problems.append(
                    f"line {instruction.line}: PARAMETER {name} {value.strip()!r} is not a number"
                )
        elif instruction.command == "MESSAGE":
            role = instruction.value.partition(" ")[0]
            if role not in MESSAGE_ROLES:
                problems.append(
                    f"line {instruction.line}: MESSAGE role {role!r} is not one of {sorted(MESSAGE_ROLES)}"
                )


def _is_projector(path: Path) -> bool:
    """A multimodal projector GGUF (general.type mmproj, or llama.cpp's clip architecture), which Ollama's
    importer takes from a second FROM line."""
    if path.suffix != ".gguf" or not path.is_file():
        return False
    try:
        values, _ = read_gguf_metadata(path, ("general.architecture", "general.type"))
    except (OSError, ValueError):
        return False
    return (
        values.get("general.type") in ("mmproj", "projector") or values.get("general.architecture") == "clip"
    )
