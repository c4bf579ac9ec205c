"""The Modelfile validator: what Ollama's parser accepts, and every Modelfile we write passes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.deploy.modelfile_check import parse_modelfile
from tests.conftest import DemoExport, run_cli

GOOD = '''# comment
FROM ./model.gguf
TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
SYSTEM """You are helpful."""
PARAMETER stop "<|im_end|>"
PARAMETER temperature 0.7
MESSAGE user Hello
'''


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    return tmp_path


def problems_of(folder: Path, text: str, newline: str = "\n") -> list[str]:
    path = folder / "Modelfile"
    path.write_bytes(text.replace("\n", newline).encode())
    return parse_modelfile(path)[1]


def test_a_valid_modelfile(folder: Path):
    instructions, problems = parse_modelfile(_write(folder, GOOD))
    assert problems == []
    assert [i.command for i in instructions] == [
        "FROM",
        "TEMPLATE",
        "SYSTEM",
        "PARAMETER",
        "PARAMETER",
        "MESSAGE",
    ]
    assert instructions[1].value.endswith("<|im_start|>assistant\n")


def _write(folder: Path, text: str) -> Path:
    path = folder / "Modelfile"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (GOOD.replace("PARAMETER temperature 0.7", "PARAMETER tfs_z 1.0"), "unknown PARAMETER 'tfs_z'"),
        (
            GOOD.replace("PARAMETER temperature 0.7", "PARAMETER Temperature 0.7"),
            "unknown PARAMETER 'Temperature'",
        ),
        (GOOD.replace("PARAMETER temperature 0.7", "PARAMETER temperature warm"), "is not a number"),
        (GOOD.replace("FROM ./model.gguf", "FROM ./missing.gguf"), "does not exist"),
        (GOOD + "FROM ./model.gguf\n", "exactly one FROM"),
        (GOOD + "RENDERER foo\n", "unknown command 'RENDERER'"),
        (GOOD + "ADAPTER ./lora.gguf\n", "ADAPTER ./lora.gguf does not exist"),
        (GOOD + 'SYSTEM """never closed\n', '""" is never closed'),
        (GOOD + "MESSAGE narrator Once upon a time\n", "MESSAGE role 'narrator'"),
    ],
)
def test_rejections(folder: Path, text: str, fragment: str):
    problems = problems_of(folder, text)
    assert any(fragment in p for p in problems), problems


def test_crlf_is_rejected(folder: Path):
    assert any("LF" in p for p in problems_of(folder, GOOD, newline="\r\n"))


def test_every_modelfile_we_wrote_passes_and_the_command_says_so(demo_export: DemoExport, folder: Path):
    for path in demo_export.out.glob("*.Modelfile"):
        assert parse_modelfile(path)[1] == [], path
        proc = run_cli("modelfile", "--check", str(path))
        assert proc.returncode == 0 and "valid for Ollama" in proc.stdout
    bad = _write(folder, GOOD.replace("PARAMETER temperature 0.7", "PARAMETER mirostat 2"))
    proc = run_cli("modelfile", "--check", str(bad))
    assert proc.returncode == 1 and "unknown PARAMETER 'mirostat'" in proc.stderr
