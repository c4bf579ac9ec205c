"""The stage cache: atomic entries, verification, pruning, and reuse through the real pipeline."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from converters.hashing import AppendHasher
from exporter.core import hashing
from exporter.core.faults import KILL_ENV
from exporter.core.hashing import RACY_NS, HashMemo, sha256_file
from exporter.engine.stage_cache import StageCache, link_into, stage_key
from tests.conftest import EXPORT_STAGES, REPO, DemoExport, DemoInputs, copy_export, export_args, run_cli


def test_entries_appear_only_when_complete_and_are_verified(tmp_path: Path):
    cache = StageCache(tmp_path)
    key = stage_key({"stage": "x", "n": 1})
    assert key == stage_key({"n": 1, "stage": "x"}) != stage_key({"stage": "x", "n": 2})
    with pytest.raises(RuntimeError), cache.build("x", key) as (staging, meta):
        (staging / "data.bin").write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert cache.lookup("x", key) is None and not list((tmp_path / "stages" / "x").iterdir())
    with cache.build("x", key) as (staging, meta):
        (staging / "data.bin").write_bytes(b"whole")
        meta["what"] = "test"
    entry = cache.lookup("x", key)
    assert entry is not None and entry.meta["what"] == "test"
    assert entry.meta["files"] == {"data.bin": sha256_file(entry.path / "data.bin")}
    target = tmp_path / "out" / "data.bin"
    target.parent.mkdir()
    link_into(entry.path / "data.bin", target)
    assert (
        target.read_bytes() == b"whole" and os.stat(target).st_ino == os.stat(entry.path / "data.bin").st_ino
    )
    (entry.path / "data.bin").write_bytes(b"tampered")  # damaged entries are dropped, not trusted
    assert cache.lookup("x", key) is None


def test_hash_memo_trusts_only_unchanged_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    memo_file = tmp_path / "hashes.json"
    data = tmp_path / "weights.bin"
    data.write_bytes(b"a" * 1000)
    old = time.time_ns() - 10 * RACY_NS
    os.utime(data, ns=(old, old))
    memo = HashMemo(memo_file)
    assert memo.sha256(data) == sha256_file(data)
    memo.save()
    read: list[Path] = []

    def counting(path: Path) -> str:
        read.append(path)
        return sha256_file(path)

    monkeypatch.setattr(hashing, "sha256_file", counting)
    again = HashMemo(memo_file)  # a later run
    assert again.sha256(data) == sha256_file(data) and read == []  # remembered, not read
    data.write_bytes(b"b" * 1000)  # same size, new contents
    os.utime(data, ns=(old + 1, old + 1))
    assert again.sha256(data) == sha256_file(data) and read == [data]  # a new mtime: read again
    data.write_bytes(b"c" * 1000)
    os.utime(data, ns=(old + 1, old + 1))  # contents changed behind an unchanged mtime, size and inode
    assert again.sha256(data) != sha256_file(data)  # what the memo cannot see …
    assert HashMemo(memo_file, trust=False).sha256(data) == sha256_file(data)  # … and --rehash can
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"just written")  # modified within RACY_NS of hashing: never remembered
    read.clear()
    again.sha256(fresh)
    again.sha256(fresh)
    assert read == [fresh, fresh]
    memo_file.write_text("{not json")
    assert HashMemo(memo_file).sha256(data) == sha256_file(data)  # a damaged memo only costs hashing


def test_cache_entries_are_verified_through_the_memo(tmp_path: Path):
    cache = StageCache(tmp_path)
    key = stage_key({"stage": "x"})
    with cache.build("x", key) as (staging, _):
        (staging / "data.bin").write_bytes(b"whole")
    cache.close()
    assert (tmp_path / "hashes.json").is_file()  # the digests computed at build time are remembered
    stored = next((tmp_path / "stages" / "x").glob("*/data.bin"))
    stored.write_bytes(b"spoil")  # same size; the write moves the modification time
    later = time.time_ns() + RACY_NS
    os.utime(stored, ns=(later, later))
    assert StageCache(tmp_path).lookup("x", key) is None


def test_prune_removes_entries_and_leftovers(tmp_path: Path):
    cache = StageCache(tmp_path)
    for n in range(3):
        with cache.build("x", stage_key({"n": n})) as (staging, _):
            (staging / "f").write_text(str(n))
    (tmp_path / "stages" / "x" / ".abc.partial-1").mkdir()
    assert len(cache.entries()) == 3
    assert cache.prune(older_than_days=1) == (1, 0)  # only the leftover of an interrupted run
    removed, freed = cache.prune()
    assert removed == 3 and freed > 3 and cache.entries() == []  # the files and their done.json


def test_unchanged_rerun_reuses_every_stage_and_gives_the_same_bytes(
    demo_export: DemoExport, demo_inputs, tmp_path: Path
):
    manifest = demo_export.manifest
    out = copy_export(demo_export.out, tmp_path / "export")
    # The session's export filled the cache; this run reuses every stage of it.
    proc = run_cli(*export_args(demo_inputs, out), "--force", "--no-check")
    assert proc.returncode == 0, proc.stderr
    again = json.loads((out / "manifest.json").read_text())
    assert set(again["cached_stages"]) == EXPORT_STAGES
    assert [a["sha256"] for a in again["artifacts"]] == [a["sha256"] for a in manifest["artifacts"]]
    assert "reused from the cache" in proc.stdout
    # Verifying is all it does: no tokenizer, no model, so neither torch nor transformers is imported.
    traced = run_cli(
        *export_args(demo_inputs, out),
        "--force",
        "--no-check",
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert traced.returncode == 0, traced.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines() if "import time:" in line
    }
    assert "exporter.commands.merge_quantize" in imported
    assert not imported & {"torch", "transformers", "llama_cpp"}


def test_adding_a_profile_quantizes_only_that_profile(demo_export: DemoExport, demo_inputs, tmp_path: Path):
    out = tmp_path / "more"
    proc = run_cli(
        *export_args(demo_inputs, out),
        "--profile",
        "Q5_K_M",
        "--profile",
        "Q6_K",
        "--jobs",
        "2",
        "--no-check",
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        "quantize:Q5_K_M" not in manifest["cached_stages"]
        and "quantize:Q6_K" not in manifest["cached_stages"]
    )
    files = {a["profile"]: a["file_type"] for a in manifest["artifacts"]}
    assert files["Q5_K_M"] == "Q5_K_M" and files["Q6_K"] == "Q6_K"  # built in parallel, each as asked
    assert {"merge", "convert", "quantize:Q4_K_M", "quantize:Q8_0", "quantize:Q2_K"} <= set(
        manifest["cached_stages"]
    )


def test_cold_run_without_cache_gives_byte_identical_files(
    demo_export: DemoExport, demo_inputs, tmp_path: Path
):
    out = tmp_path / "cold"
    proc = run_cli(*export_args(demo_inputs, out), "--no-cache", "--no-check")
    assert proc.returncode == 0, proc.stderr
    cold = json.loads((out / "manifest.json").read_text())
    assert cold["cached_stages"] == []
    warm = {a["profile"]: a["sha256"] for a in demo_export.manifest["artifacts"]}
    assert {a["profile"]: a["sha256"] for a in cold["artifacts"]} == warm
    assert not list(out.glob(".edge-export-stages-*"))  # the throwaway cache is gone


def test_killed_run_leaves_nothing_finished_looking_and_resumes(demo_inputs: DemoInputs, tmp_path: Path):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    env = dict(os.environ, EDGE_EXPORT_CACHE_DIR=str(cache))
    args = [sys.executable, "-m", "exporter", *export_args(demo_inputs, out), "--no-check"]
    # Killed with the F16 GGUF written into the staging folder, before it is published.
    killed = subprocess.run(args, cwd=REPO, env={**env, KILL_ENV: "convert:built"}, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list((cache / "stages" / "convert").glob(".*.partial-*/model.gguf"))
    assert not list((cache / "stages").glob("convert/*/done.json"))
    assert list((cache / "stages").glob("merge/*/done.json"))  # the finished stage is kept
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.gguf"))
    resumed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    # The chat template is translated beside the conversion, so it may have finished before the kill.
    assert set(manifest["cached_stages"]) - {"chat"} == {"merge"}
    assert not list((cache / "stages" / "convert").glob(".*.partial-*"))  # the killed run's staging folder


WRITER = """
import sys, time
path, mode = sys.argv[1], sys.argv[2]
with open(path, "wb") as f:
    for n in range(20):
        f.write(bytes([n]) * 100_000); f.flush(); time.sleep(0.01)
if mode == "rewrite":  # truncated, then written again to the same size
    time.sleep(0.2)
    with open(path, "wb") as f:
        f.flush(); time.sleep(0.2)
        f.write(bytes([7]) * 2_000_000)
"""


@pytest.mark.parametrize("mode", ["append", "rewrite"])
def test_append_hasher_follows_a_growing_file_and_gives_up_on_a_rewrite(tmp_path: Path, mode: str):
    import subprocess
    import sys

    target = tmp_path / "growing.bin"
    hasher = AppendHasher(target)
    subprocess.run([sys.executable, "-c", WRITER, str(target), mode], check=True)
    digest = hasher.digest()
    if mode == "append":
        assert digest == sha256_file(target)
    else:
        assert digest is None  # the caller hashes the finished file instead


def test_unchanged_rerun_takes_gguf_headers_from_the_cache(
    demo_export: DemoExport, demo_inputs: DemoInputs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """A GGUF header is read by walking the whole vocabulary; cached GGUFs carry theirs in the entry."""
    from exporter.commands.merge_quantize import merge_quantize
    from exporter.inputs.options import ExportOptions, InputOptions, OutputOptions, ProfileOptions
    from exporter.quality import tokenizer_parity
    from exporter.stages import gguf

    def refuse(path: Path) -> None:
        raise AssertionError(f"read the header of {path}")

    monkeypatch.setattr(gguf, "read_gguf_header", refuse)
    monkeypatch.setattr(tokenizer_parity, "read_gguf_header", refuse)
    options = ExportOptions(
        inputs=InputOptions(adapters=((demo_inputs.adapter, 1.0),), base=str(demo_inputs.base)),
        output=OutputOptions(copy_export(demo_export.out, tmp_path / "export"), "smollm2-pirate", force=True),
        profiles=ProfileOptions(("Q4_K_M", "q8_0", "Q2_K")),
        check=False,
    )
    result = merge_quantize(options)
    recorded = {a["profile"]: a for a in demo_export.manifest["artifacts"]}
    for artifact in result.artifacts:  # file types and bits per weight as when the GGUFs were read
        assert artifact.file_type == recorded[artifact.profile]["file_type"]
        assert artifact.bits_per_weight == recorded[artifact.profile]["bits_per_weight"]


def test_merged_weights_are_released_once_converted_and_merged_again_only_when_needed(
    demo_export: DemoExport, demo_inputs: DemoInputs, tmp_path: Path
):
    # The shared export kept the merged folder's config, tokenizer and template, not its weights: the
    # F16 GGUF holds them.
    merged = demo_export.out / "merged"
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert not list(merged.glob("*.safetensors"))
    assert demo_export.manifest["merge"]["weights"].startswith("released once the F16 GGUF held them")

    # An isolated cache. A run that still finds the F16 GGUF cached reuses the thin merge
    # (test_unchanged_rerun_reuses_every_stage_and_gives_the_same_bytes); once the conversion is gone, the
    # merge is made again, to the same bytes.
    env = {"EDGE_EXPORT_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "out"
    first = run_cli(*export_args(demo_inputs, out), "--no-check", env=env)
    assert first.returncode == 0, first.stderr
    assert "released the merged weights" in first.stdout
    # The cache's entry gave them up too, says which it had, and keeps the rest.
    (done,) = (tmp_path / "cache" / "stages" / "merge").glob("*/done.json")
    meta = json.loads(done.read_text())
    assert "merged/model.safetensors" in meta["released"] and "merged/config.json" in meta["files"]
    assert not (done.parent / "merged" / "model.safetensors").exists()
    for entry in (tmp_path / "cache" / "stages" / "convert").iterdir():
        shutil.rmtree(entry)
    remade = run_cli(*export_args(demo_inputs, out), "--no-check", "--force", env=env)
    assert remade.returncode == 0, remade.stderr
    assert "gave up its weights after conversion; merging again" in remade.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert "merge" not in manifest["cached_stages"]
    assert manifest["intermediates"][0]["sha256"] == demo_export.manifest["intermediates"][0]["sha256"]

    # --keep-merged keeps them, in the output and the cache.
    kept = tmp_path / "kept"
    proc = run_cli(*export_args(demo_inputs, kept), "--no-check", "--keep-merged", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (kept / "merged" / "model.safetensors").is_file()
    assert json.loads((kept / "manifest.json").read_text())["merge"]["weights"] == "kept (--keep-merged)"
