#!/usr/bin/env python3
"""Fetch the pinned llama.cpp converter scripts from the llama-cpp-python sdist.

The pin lives in vendor/llama_cpp.toml. This script downloads exactly that sdist from the package
index (through pip, so pip's proxy and cache settings apply), refuses it unless its sha256 matches
the pin, checks that the llama.cpp commit recorded inside the sdist is the pinned one, and extracts
convert_hf_to_gguf.py, convert_lora_to_gguf.py, conversion/, gguf-py/ and LICENSE into
vendor/llama.cpp/ with a REVISION.json stamp. The sdist stays in vendor/downloads/: the Makefile
installs llama-cpp-python's Python bindings from it, and converters/llama_tools.py builds llama.cpp from
the sources inside it. It is a no-op when the stamp matches and the sdist is there.
Standard library only: it runs before the project is installed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

VENDOR_DIR = Path(__file__).resolve().parent
PIN_FILE = VENDOR_DIR / "llama_cpp.toml"
TARGET_DIR = VENDOR_DIR / "llama.cpp"
DOWNLOAD_DIR = VENDOR_DIR / "downloads"
STAMP_NAME = "REVISION.json"
# Paths inside <sdist>/vendor/llama.cpp/ that the exporter needs.
WANTED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_pin() -> dict[str, str]:
    with PIN_FILE.open("rb") as handle:
        return tomllib.load(handle)


def stamp_matches(pin: dict[str, str]) -> bool:
    stamp = TARGET_DIR / STAMP_NAME
    if not stamp.is_file():
        return False
    recorded = json.loads(stamp.read_text())
    return all(
        recorded.get(key) == pin[key] for key in ("llama_cpp_python", "llama_cpp_commit", "sdist_sha256")
    )


def download_sdist(pin: dict[str, str]) -> Path:
    sdist = DOWNLOAD_DIR / pin["sdist"]
    if sdist.is_file() and sha256_of(sdist) == pin["sdist_sha256"]:
        return sdist
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--dest",
        str(DOWNLOAD_DIR),
        f"llama-cpp-python=={pin['llama_cpp_python']}",
    ]
    print(f"downloading {pin['sdist']} from the package index")
    subprocess.run(command, check=True)
    actual = sha256_of(sdist)
    if actual != pin["sdist_sha256"]:
        sdist.unlink()
        sys.exit(
            f"error: {sdist.name} has sha256 {actual}, but {PIN_FILE} pins {pin['sdist_sha256']}. "
            "The download was removed; check your package index or mirror, then run `make vendor` again."
        )
    return sdist


def extract(sdist: Path, pin: dict[str, str]) -> None:
    root = sdist.name.removesuffix(".tar.gz")
    prefix = f"{root}/vendor/llama.cpp/"
    head_member = f"{root}/.git/modules/vendor/llama.cpp/HEAD"
    staging = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=VENDOR_DIR))
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            commit = None
            members = []
            for member in archive.getmembers():
                if member.name == head_member:
                    handle = archive.extractfile(member)
                    commit = handle.read().decode().strip() if handle else None
                elif member.name.startswith(prefix):
                    relative = member.name[len(prefix) :]
                    if any(relative == w or (w.endswith("/") and relative.startswith(w)) for w in WANTED):
                        member.name = relative
                        members.append(member)
            if commit != pin["llama_cpp_commit"]:
                sys.exit(
                    f"error: {sdist.name} was built from llama.cpp {commit}, but {PIN_FILE} pins "
                    f"{pin['llama_cpp_commit']}. Update the pin (version, sha256 and commit together)."
                )
            archive.extractall(staging, members=members, filter="data")
        stamp = {key: pin[key] for key in ("llama_cpp_python", "llama_cpp_commit", "sdist_sha256")}
        (staging / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
        if TARGET_DIR.exists():
            shutil.rmtree(TARGET_DIR)
        staging.rename(TARGET_DIR)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def main() -> None:
    pin = read_pin()
    sdist = DOWNLOAD_DIR / pin["sdist"]
    if stamp_matches(pin) and sdist.is_file():
        print(
            f"vendor/llama.cpp is at llama.cpp {pin['llama_cpp_commit'][:9]} (llama-cpp-python {pin['llama_cpp_python']})"
        )
        return
    sdist = download_sdist(pin)
    extract(sdist, pin)
    print(f"vendored llama.cpp {pin['llama_cpp_commit'][:9]} from {sdist.name} into {TARGET_DIR}")


if __name__ == "__main__":
    main()
