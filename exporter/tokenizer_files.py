"""What a tokenizer folder and an adapter file say about the vocabulary, read from the files alone (no
torch, no transformers): a run whose stages are all cached imports neither."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.safetensors_header import read_header

if TYPE_CHECKING:
    from exporter.adapter import LoraAdapter


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
