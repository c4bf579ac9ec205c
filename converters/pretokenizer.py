"""llama.cpp's pre-tokenizer for a tokenizer that is a base's plus added tokens.

llama.cpp's converter names a BPE tokenizer's pre-tokenizer by hashing the ids its tokenizer gives a
fixed text, and knows only the hashes of the tokenizers it was written for. Added tokens split text
before the pre-tokenizer runs, so a tokenizer that only grew its added-token list (TRL's
`clone_chat_template` copies another family's tokens, some of them newline or space runs that occur in
that text) hashes differently although its pre-tokenizer is the base's own. When the files prove that
the pre-tokenizer, the normaliser, the model (vocabulary and merges) and the decoder are the base's, and
every token the base added is still there with its id, the converter may identify the pre-tokenizer
from the base's tokenizer; the tokenizer parity check then proves the GGUF tokenizes every added token
as the tokenizer does.

`python -m converters.pretokenizer BASE_DIR SCRIPT ARGS...` runs the vendored SCRIPT with ARGS, its
hash lookup falling back to BASE_DIR's tokenizer only where its own tokenizer is not in the table.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

# The parts of tokenizer.json that decide how text becomes tokens apart from the added tokens.
_SAME_PARTS = ("normalizer", "pre_tokenizer", "model", "decoder")
# Printed on stderr by the child when the fallback named the pre-tokenizer.
MARKER = "edge-export: pre-tokenizer identified from the base tokenizer:"


def _tokenizer_json(folder: Path) -> dict[str, Any] | None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def grown_from(folder: Path, base: Path) -> int | None:
    """How many added tokens `folder`'s tokenizer has beyond `base`'s, when it is `base`'s tokenizer with
    added tokens only (at least one); else None."""
    ours, theirs = _tokenizer_json(folder), _tokenizer_json(base)
    if ours is None or theirs is None or folder.resolve() == base.resolve():
        return None
    if any(ours.get(part) != theirs.get(part) for part in _SAME_PARTS):
        return None
    added = {(t["id"], t["content"]) for t in ours.get("added_tokens") or []}
    base_added = {(t["id"], t["content"]) for t in theirs.get("added_tokens") or []}
    if not base_added <= added or added == base_added:
        return None
    return len(added - base_added)


def main(argv: list[str]) -> None:
    base_dir, script, *args = argv
    sys.path.insert(0, str(Path(script).parent))
    from conversion import base  # the vendored converter's package (gguf-py is on PYTHONPATH)

    lookup = base.TextModel.get_vocab_base_pre

    def identified(self: Any, tokenizer: Any) -> str:
        try:
            return str(lookup(self, tokenizer))
        except NotImplementedError:
            from transformers import AutoTokenizer

            name = str(lookup(self, AutoTokenizer.from_pretrained(base_dir)))
            print(f"{MARKER} {name}", file=sys.stderr, flush=True)
            return name

    base.TextModel.get_vocab_base_pre = identified
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
