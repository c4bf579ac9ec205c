"""Bases named by Hugging Face id are found in the local cache, offline, never downloaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from exporter.core.errors import InputError
from exporter.inputs.adapter import read_adapter, resolve_base
from exporter.merge import merge_adapters
from tests.conftest import run_cli
from tests.tiny import make_adapter, make_tiny_llama


def cache_model(repo_id: str, source: Path) -> Path:
    """Lay out `source` the way huggingface_hub caches a downloaded snapshot."""
    cache = Path(os.environ["HF_HUB_CACHE"])
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(source, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    base = make_tiny_llama(root / "base")
    snapshot = cache_model("tiny-org/tiny-llama", base)
    adapter = make_adapter(base, root / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "tiny-org/tiny-llama"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return {"base": base, "snapshot": snapshot, "adapter": adapter, "root": root}


def test_default_base_is_resolved_from_the_cache(cached):
    adapter = read_adapter(cached["adapter"])
    assert resolve_base(None, adapter) == cached["snapshot"]
    assert resolve_base("tiny-org/tiny-llama", adapter) == cached["snapshot"]


def test_merge_command_uses_the_cached_base(cached, tmp_path: Path):
    proc = run_cli("merge", "--adapter", str(cached["adapter"]), "--out", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    assert str(cached["snapshot"]) in " ".join(proc.stdout.split())


def test_recorded_base_in_the_cache_is_checked_against_the_given_base(cached, tmp_path: Path):
    other = make_tiny_llama(tmp_path / "wider", hidden=32)
    with pytest.raises(InputError, match=r"was trained on tiny-org/tiny-llama \(hidden_size=64\)"):
        merge_adapters(other, [read_adapter(cached["adapter"])], tmp_path / "out")
    assert not (tmp_path / "out").exists()
