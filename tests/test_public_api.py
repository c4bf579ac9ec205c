"""The public Python API: `from exporter import merge_quantize, ExportOptions, …`, imported lazily."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import exporter
from tests.conftest import REPO


def test_every_public_name_imports_from_its_module():
    assert set(exporter.__all__) == {"__version__", *exporter.PUBLIC_NAMES}
    for name, module in exporter.PUBLIC_NAMES.items():
        assert getattr(exporter, name) is getattr(importlib.import_module(module), name), name


def test_an_unknown_name_is_an_attribute_error_that_lists_the_public_names():
    with pytest.raises(AttributeError, match="merge_quantize"):
        exporter.merge_and_quantize  # noqa: B018


def test_import_exporter_is_light():
    """`import exporter` and building options import no torch, no transformers and no command."""
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "import exporter.core.errors\n"
        "from exporter import ExportOptions, InputOptions, OutputOptions, __version__\n"
        "ExportOptions(inputs=InputOptions(adapters=((Path('a'), 1.0),)), output=OutputOptions(out=Path('o')))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'exporter.commands') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"importing the API's options pulled in {done.stdout.strip()}"


def test_export_options_are_built_by_keywords_with_defaults():
    options = exporter.ExportOptions(
        inputs=exporter.InputOptions(adapters=((Path("adapter"), 1.0),), base="base"),
        output=exporter.OutputOptions(out=Path("out"), name="pirate"),
        profiles=exporter.ProfileOptions(names=("Q4_K_M", "Q8_0")),
    )
    assert options.run == exporter.RunOptions() and options.quality == exporter.QualityOptions()
    assert options.check and not options.has_imatrix
    runtime = exporter.RuntimeLoraOptions(inputs=options.inputs, output=options.output, compare_merged=True)
    assert runtime.profiles.names == ("Q4_K_M",)


def test_options_keep_their_validation():
    with pytest.raises(exporter.ExportError, match="--jobs 0"):
        exporter.RunOptions(jobs=0)
