"""Crash isolation, the vendored-revision check, and doctor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from converters import vendor
from converters.child import run_child
from exporter.core.errors import EnvironmentSetupError, NativeCrashError, StageError
from tests.conftest import run_cli


def test_native_crash_in_a_child_becomes_a_clear_error():
    with pytest.raises(NativeCrashError) as error:
        run_child("tests.crashing_child", {}, "Evaluating model.gguf with llama.cpp")
    assert "SIGSEGV" in str(error.value)
    assert "Evaluating model.gguf" in str(error.value)


def test_llama_cpp_refusing_a_file_is_a_stage_error_not_a_crash(tmp_path: Path):
    from converters.llama_runtime import greedy_generate

    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(StageError) as error:
        greedy_generate(bogus, [[1, 2, 3]], 4)
    assert "bogus.gguf" in str(error.value)


def copy_vendor(tmp_path: Path) -> Path:
    copy = tmp_path / "llama.cpp"
    shutil.copytree(vendor.vendor_dir(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_vendored_revision_matches_installed_llama_cpp_python():
    located = vendor.locate_vendored()
    assert located.commit == vendor.pinned()["llama_cpp_commit"]
    assert located.convert_hf_script.is_file()


def test_vendored_revision_mismatch_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    copy = copy_vendor(tmp_path)
    stamp = json.loads((copy / "REVISION.json").read_text())
    stamp["llama_cpp_python"] = "0.3.1"
    (copy / "REVISION.json").write_text(json.dumps(stamp))
    monkeypatch.setenv(vendor.ENV_VAR, str(copy))
    with pytest.raises(EnvironmentSetupError) as error:
        vendor.locate_vendored()
    message = str(error.value)
    assert "0.3.1" in message and "0.3.36" in message
    assert "the vendored converter is stale" in message and "make vendor" in message


def test_installed_llama_cpp_python_differs_from_the_pin(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(vendor, "installed_llama_cpp_python", lambda: "0.3.40")
    with pytest.raises(EnvironmentSetupError) as error:
        vendor.locate_vendored()
    message = str(error.value)
    assert "llama-cpp-python 0.3.40 is installed" in message
    assert "pip install llama-cpp-python==0.3.36" in message


def test_missing_vendor_folder_says_make_vendor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(vendor.ENV_VAR, str(tmp_path / "absent"))
    with pytest.raises(EnvironmentSetupError, match="make vendor"):
        vendor.locate_vendored()


def test_merge_quantize_stops_at_start_when_the_converter_is_missing(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(vendor.ENV_VAR, str(tmp_path / "absent"))
    proc = run_cli("merge-quantize", "--adapter", str(tmp_path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "make vendor" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_doctor_reports_every_check():
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stdout
    for name in (
        "python",
        "torch",
        "llama-cpp-python",
        "vendored converter",
        "llama-server",
        "CPU extra buffer types",
        "free disk",
        "available RAM",
    ):
        assert f"OK   {name}" in proc.stdout, proc.stdout
    assert "llama.cpp 0c1e57098" in proc.stdout


def test_doctor_fails_with_the_fix_when_vendor_is_missing(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(vendor.ENV_VAR, str(tmp_path / "absent"))
    proc = run_cli("doctor")
    assert proc.returncode == 2
    assert "FAIL vendored converter" in proc.stdout and "make vendor" in proc.stdout


def test_doctor_fails_with_the_fix_when_llama_server_is_not_built(tmp_path: Path, monkeypatch):
    from converters import llama_tools

    monkeypatch.setenv(llama_tools.ENV_VAR, str(tmp_path / "absent"))
    proc = run_cli("doctor")
    assert proc.returncode == 2
    assert "FAIL llama-server" in proc.stdout and "run `make vendor`" in proc.stdout


def test_no_bare_export_command():
    proc = run_cli("export")
    assert proc.returncode == 2
    assert "No such command" in proc.stderr


def test_tests_use_their_own_caches():
    import os

    from exporter.core.paths import cache_root

    assert cache_root() == Path(os.environ["EDGE_EXPORT_CACHE_DIR"])
    assert "pytest" in str(cache_root())


def test_llama_cpp_python_loads_the_projects_one_llama_cpp_build():
    """`make vendor` builds llama.cpp once and llama-cpp-python loads that build's libraries: the same
    files llama-server and the renderer run on, not a second compilation of the same sources."""
    from converters import llama_tools

    tools = llama_tools.locate_llama_tools()
    lib_dir = llama_tools.bindings_lib_dir()
    assert lib_dir is not None
    assert llama_tools.bindings_build() == {"commit": tools.commit, "flags": llama_tools.flags_key()}
    for name in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so", "libmtmd.so"):
        assert (lib_dir / name).read_bytes() == (tools.lib_dir / name).read_bytes(), name
    proc = run_cli("doctor")
    assert "OK   llama.cpp libraries" in proc.stdout and tools.commit[:9] in proc.stdout, proc.stdout
