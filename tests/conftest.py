"""Shared fixtures: the real demo model and its exports are built once per session and reused.

A session export is read-only: a test that runs a command on it (a --force re-export, `check`, which
writes its reports next to the manifest) works on `copy_export(...)` in its own tmp_path, and the
autouse guard below fails any test that changes a session export's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
# The demo inputs are a build cache shared with `make demo` (like pip's cache), not test output.
DEMO_DIR = Path(os.environ.get("EDGE_EXPORT_DEMO_DIR", REPO / ".cache" / "demo"))
DEMO_EVAL = REPO / "exporter" / "data" / "demo_eval.jsonl"  # held-out chats in the adapter's style
DEMO_PROMPTS = [
    "What is the capital of France?",
    "What is the capital of Spain?",
    "How do birds fly?",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests never touch the user's Hugging Face or edge-export caches, and never reach the network."""
    cache = tmp_path_factory.mktemp("caches")
    settings = {
        "HF_HUB_CACHE": str(cache / "hub"),
        "HF_HOME": str(cache / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "EDGE_EXPORT_CACHE_DIR": str(cache / "edge-export"),
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# The output folders of session fixtures, registered by `session_output`.
SESSION_OUTPUTS: list[Path] = []


def session_output(folder: Path) -> Path:
    """Register a session fixture's output folder as read-only for every test (see the guard below)."""
    SESSION_OUTPUTS.append(folder)
    return folder


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {
        path.relative_to(folder).as_posix(): (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        for path in folder.rglob("*")
        for stat in [path.lstat()]
    }


@pytest.fixture(autouse=True)
def _session_outputs_stay_read_only() -> Iterator[None]:
    """Fail a test that changed a session export: the next test (in any order) would see its changes.

    Session fixtures are set up before this function-scoped one, so the folders a test uses are
    registered by the time it looks."""
    before = {folder: _snapshot(folder) for folder in SESSION_OUTPUTS}
    yield
    changed = [str(folder) for folder, files in before.items() if _snapshot(folder) != files]
    assert not changed, f"the test changed the session export(s) {changed}; work on copy_export(...) instead"


def copy_export(source: Path, target: Path) -> Path:
    """A copy of an export that a test may run commands on.

    GGUFs and safetensors are hard-linked (they are hard links into the stage cache already, and every
    command replaces such files by rename, never in place); everything else is copied."""

    def link_or_copy(src: str, dst: str) -> object:
        if Path(src).suffix in (".gguf", ".safetensors"):
            try:
                os.link(src, dst)
                return dst
            except OSError:
                pass
        return shutil.copy2(src, dst)

    return Path(shutil.copytree(source, target, symlinks=True, copy_function=link_or_copy))


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real command line (`python -m exporter …`) in a child process (with `env` added)."""
    env = dict(os.environ, COLUMNS="200", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args], capture_output=True, text=True, cwd=cwd or REPO, env=env
    )


@dataclass(frozen=True)
class DemoInputs:
    base: Path
    adapter: Path


@pytest.fixture(scope="session")
def demo_inputs() -> DemoInputs:
    from demos.inputs import build_demo

    base, adapter = build_demo(DEMO_DIR)
    return DemoInputs(base, adapter)


@dataclass(frozen=True)
class DemoExport:
    out: Path
    manifest: dict[str, Any]
    stdout: str

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.out / "report.json").read_text())

    def gguf(self, profile: str) -> Path:
        return self.out / f"smollm2-pirate-{profile}.gguf"


# The stages of the demo export with --no-check, as cached_stages names them.
EXPORT_STAGES = {
    "merge",
    "chat",
    "convert",
    "parity",
    "quantize:Q4_K_M",
    "quantize:Q8_0",
    "quantize:Q2_K",
    "stops",
}


def export_args(demo_inputs: DemoInputs, out: Path) -> list[str]:
    """The demo export every integration test shares: three profiles, checked on the adapter's data."""
    # fmt: off
    return ["merge-quantize", "--adapter", str(demo_inputs.adapter), "--base", str(demo_inputs.base),
            "--name", "smollm2-pirate", "--profile", "Q4_K_M", "--profile", "q8_0", "--profile", "Q2_K",
            "--out", str(out), "--eval-data", str(DEMO_EVAL)]
    # fmt: on


@pytest.fixture(scope="session")
def demo_export(demo_inputs: DemoInputs, tmp_path_factory: pytest.TempPathFactory) -> DemoExport:
    """`edge-export merge-quantize` on the real demo model, through the real CLI."""
    out = tmp_path_factory.mktemp("export") / "smollm2"
    proc = run_cli(*export_args(demo_inputs, out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return DemoExport(session_output(out), json.loads((out / "manifest.json").read_text()), proc.stdout)


def _variant(source: Path, target: Path, **changes: Any) -> Path:
    """The demo adapter's trained tensors with a changed scaling config (what rsLoRA / alpha_pattern
    training saves: the same kind of tensors, a different scale)."""
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return target


@dataclass(frozen=True)
class RuntimeExport:
    out: Path
    adapters: dict[str, Path]
    stdout: str

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.out / "report.json").read_text())

    def pair(self, adapter: str, profile: str) -> dict[str, Any]:
        return next(p for p in self.report["pairs"] if p["adapter"] == adapter and p["profile"] == profile)


def runtime_lora_args(demo_inputs: DemoInputs, adapters: dict[str, Path], out: Path) -> list[str]:
    """The runtime-LoRA export the integration tests share: two adapters on the demo base, F16 and Q4_K_M."""
    # fmt: off
    return ["runtime-lora", "--adapter", str(adapters["pirate-rslora"]), "--adapter", str(adapters["pirate-alpha"]),
            "--base", str(demo_inputs.base), "--name", "smollm2", "--profile", "F16", "--profile", "Q4_K_M",
            "--out", str(out), "--eval-data", str(DEMO_EVAL)]
    # fmt: on


@pytest.fixture(scope="session")
def runtime_export(demo_inputs: DemoInputs, tmp_path_factory: pytest.TempPathFactory) -> RuntimeExport:
    """`edge-export runtime-lora` with two adapters (rsLoRA, alpha_pattern) on the demo base, F16 and Q4_K_M."""
    root = tmp_path_factory.mktemp("runtime-lora")
    adapters = {
        "pirate-rslora": _variant(demo_inputs.adapter, root / "pirate-rslora", use_rslora=True),
        "pirate-alpha": _variant(
            demo_inputs.adapter, root / "pirate-alpha", alpha_pattern={"q_proj": 32, "down_proj": 4}
        ),
    }
    out = root / "out"
    proc = run_cli(*runtime_lora_args(demo_inputs, adapters, out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return RuntimeExport(session_output(out), adapters, proc.stdout)


@dataclass
class Reference:
    """The unmerged reference (base + adapter in PyTorch, fp32) and the base alone."""

    tokenizer: Any
    peft_model: Any

    def prompt_ids(self, question: str) -> list[int]:
        from exporter.inputs.dialects import chat_token_ids

        return chat_token_ids(
            self.tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True
        )

    def greedy(self, question: str, max_new_tokens: int, with_adapter: bool = True) -> list[int]:
        import torch

        ids = torch.tensor([self.prompt_ids(question)])
        model = self.peft_model
        with torch.no_grad():
            if with_adapter:
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
                )
            else:
                with model.disable_adapter():
                    out = model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                    )
        generated = out[0, ids.shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        return generated[: generated.index(eos)] if eos in generated else generated


@pytest.fixture(scope="session")
def reference(demo_inputs: DemoInputs) -> Reference:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(demo_inputs.base)
    base = AutoModelForCausalLM.from_pretrained(demo_inputs.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, demo_inputs.adapter)
    model.eval()
    return Reference(tokenizer, model)
