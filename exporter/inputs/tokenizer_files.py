"""What a tokenizer folder and an adapter file say about the vocabulary, read from the files alone (no
torch, no transformers): a run whose stages are all cached imports neither."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.inputs.safetensors_header import read_header

if TYPE_CHECKING:
    from exporter.inputs.adapter import LoraAdapter


def tokenizer_size(folder: Path) -> int | None:
    """Number of entries of a fast tokenizer (tokenizer.json: its vocabulary and added tokens)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [token["id"] for token in data.get("added_tokens") or []]
    return max(ids) + 1 if ids else None


def token_texts(folder: Path) -> set[str] | None:
    """Every token's text in a fast tokenizer (tokenizer.json: its vocabulary and added tokens)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = (data.get("model") or {}).get("vocab") or {}
    texts = set(vocab) if isinstance(vocab, dict) else {str(entry[0]) for entry in vocab}
    return texts | {token["content"] for token in data.get("added_tokens") or []}


# llama.cpp (llama-vocab.cpp, load) gives the tokens of a model whose general.name contains one of these
# special attributes by looking each one up with unordered_map::at: a vocabulary without one of them cannot
# be loaded at all ("error loading model vocabulary: unordered_map::at").
NAME_QUIRKS = {("phi-3", "phi3"): ("</s>", "<unk>", "<s>", "<|endoftext|>")}


def gguf_name_error(name: str, tokenizer_dirs: list[Path]) -> str | None:
    """Why llama.cpp could not load a GGUF named `name` with this vocabulary (the first tokenizer.json of
    `tokenizer_dirs`: an adapter's own tokenizer before the base's), or None."""
    for fragments, needed in NAME_QUIRKS.items():
        hit = next((f for f in fragments if f in name.lower()), None)
        if hit is None:
            continue  # the usual case: the tokenizer is not read at all
        folder = next((d for d in tokenizer_dirs if (d / "tokenizer.json").is_file()), None)
        texts = None if folder is None else token_texts(folder)
        if folder is None or texts is None:
            return None
        missing = [t for t in needed if t not in texts]
        if missing:
            return (
                f"The export name {name!r} contains {hit!r}, and llama.cpp treats a GGUF whose name contains "
                f"{' or '.join(repr(f) for f in fragments)} as Phi-3, looking up the tokens "
                f"{', '.join(needed)} in its vocabulary; {folder / 'tokenizer.json'} has no "
                f"{', '.join(missing)}, so llama.cpp and the runtimes built on it could not load the GGUF at all. "
                "Pass --name with a name that does not contain it."
            )
    return None


def special_token_ids(tokenizer_dir: Path) -> dict[str, int | None]:
    """The ids of the tokenizer's eos, bos and pad tokens, read from its files."""
    try:
        config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    by_text = {token["content"]: token["id"] for token in data.get("added_tokens") or []}
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        by_text = {**vocab, **by_text}
    result: dict[str, int | None] = {}
    for role in ("eos", "bos", "pad"):
        token = config.get(f"{role}_token")
        text = token.get("content") if isinstance(token, dict) else token
        if isinstance(text, str) and text in by_text:
            result[role] = int(by_text[text])
    return result


def saved_vocab_rows(adapter: LoraAdapter) -> int | None:
    """Rows of the vocabulary matrices an adapter saved (from the file's header), when they are saved."""
    if adapter.weights.suffix != ".safetensors":
        return None
    rows = {
        entry.shape[0]
        for entry in read_header(adapter.weights)
        if len(entry.shape) == 2
        and entry.name.endswith(".weight")
        and any(part in entry.name for part in ("embed_tokens", "lm_head", ".wte.", "embed_in"))
        and not re.search(r"lora_(embedding_)?[AB]", entry.name)
    }
    return max(rows) if rows else None
