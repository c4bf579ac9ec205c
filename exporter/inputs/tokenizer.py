"""Load a Hugging Face tokenizer from a local folder, safely from the stage threads.

Light stages (chat, parity) run in threads of one process, and transformers' lazy top-level imports
are not thread-safe: two threads importing AutoTokenizer at once can fail with "cannot import name
'AutoTokenizer' from 'transformers'". The first import is made under a lock.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

_IMPORT_LOCK = threading.Lock()


def load_tokenizer(folder: Path) -> Any:
    """AutoTokenizer.from_pretrained(folder), local files only."""
    with _IMPORT_LOCK:
        from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
