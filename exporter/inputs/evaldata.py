"""Evaluation data for the quality check, tokenized once with the model's own HF tokenizer.

Accepted: a plain-text file (split into windows of `window` tokens), or JSONL where each line is
{"messages": [...]} (rendered with the model's chat template) or {"text": "..."}. Without a file,
a built-in set of varied text and chat exchanges is used. Both sides of every comparison are fed
exactly these token ids, so tokenizer differences cannot hide in the metrics.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from exporter.core.errors import InputError
from exporter.inputs.dialects import chat_token_ids, render_chat
from exporter.inputs.image_rows import has_image

DEFAULT_SET = "eval_default.jsonl"
WINDOW = 256
MIN_TOKENS = 16
LABEL = ("evaluation data", "--eval-data")
# --eval-tokens auto: the whole set up to this many base weights; above, the scored tokens × weights held
# near a full check of such a model (the check's compute is both), never under AUTO_MIN_TOKENS.
AUTO_FULL_WEIGHTS = 1_500_000_000
AUTO_MIN_TOKENS = 512
EVAL_TOKEN_SETTINGS = ("auto", "all")


def token_budget(setting: str, base_weights: int, full_tokens: int) -> int | None:
    """The scored tokens --eval-tokens allows (None: every token of the set) for a base of `base_weights`
    weights and an evaluation set of `full_tokens` scored tokens."""
    if setting == "all":
        return None
    if setting != "auto":
        return int(setting)
    if base_weights <= AUTO_FULL_WEIGHTS:
        return None
    return max(AUTO_MIN_TOKENS, full_tokens * AUTO_FULL_WEIGHTS // base_weights)


def check_eval_tokens(setting: str) -> None:
    if setting in EVAL_TOKEN_SETTINGS or (setting.isdigit() and int(setting) >= MIN_TOKENS):
        return
    raise InputError(
        f"--eval-tokens {setting!r} is not a setting: give a number of tokens (at least {MIN_TOKENS}), "
        "all (the whole evaluation set), or auto (the whole set up to 1.5B weights, fewer above)."
    )


@dataclass(frozen=True)
class EvalData:
    """Token sequences to score, and the chat prompts used for greedy-continuation checks."""

    source: str
    sequences: tuple[tuple[int, ...], ...]
    prompts: tuple[tuple[int, ...], ...]

    @property
    def n_scored(self) -> int:
        return sum(len(s) - 1 for s in self.sequences)

    @property
    def max_length(self) -> int:
        return max(len(s) for s in self.sequences)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps([self.sequences, self.prompts]).encode())
        return digest.hexdigest()

    def within(self, budget: int | None) -> EvalData:
        """Every k-th window, k the largest that still scores `budget` tokens (spread over the whole set,
        not its beginning); the greedy prompts stay. Itself when the budget covers the set."""
        if budget is None or self.n_scored <= budget:
            return self
        stride = self.n_scored // budget
        chosen = self.sequences[::stride]
        scored = sum(len(s) - 1 for s in chosen)
        source = f"{self.source}, one window in {stride}: {scored} of {self.n_scored} tokens"
        return EvalData(source, chosen, self.prompts)


def _read_rows(path: Path | None, label: tuple[str, str] = LABEL) -> tuple[str, list[dict[str, Any]] | str]:
    what, option = label
    if path is None:
        text = resources.files("exporter").joinpath("data", DEFAULT_SET).read_text(encoding="utf-8")
        return f"built-in ({DEFAULT_SET})", [json.loads(line) for line in text.splitlines() if line.strip()]
    if not path.is_file():
        raise InputError(f"The {what} {path} does not exist. Pass a .txt or .jsonl file to {option}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"The {what} {path} is not UTF-8 text ({exc}); convert it to UTF-8.") from exc
    if path.suffix != ".jsonl":
        return str(path), text
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{path} line {number} is not JSON ({exc}); each line must be an object."
            ) from exc
        if not isinstance(row, dict) or not ({"messages", "text"} & set(row)):
            raise InputError(f'{path} line {number} needs a "messages" list or a "text" string.')
        rows.append(row)
    return str(path), rows


def load_eval_data(
    path: Path | None,
    tokenizer: Any,
    window: int = WINDOW,
    n_prompts: int = 8,
    label: tuple[str, str] = LABEL,
) -> EvalData:
    """Tokenize evaluation data into sequences of at most `window` tokens, plus chat prompts.

    `label` names the data and its option in error messages (also used for calibration data).
    """
    source, rows = _read_rows(path, label)
    sequences: list[tuple[int, ...]] = []
    prompts: list[tuple[int, ...]] = []

    def add_text(text: str) -> None:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(0, len(ids), window):
            chunk = ids[start : start + window]
            if len(chunk) >= MIN_TOKENS:
                sequences.append(tuple(chunk))

    if isinstance(rows, str):
        add_text(rows)
    else:
        for row in rows:
            if has_image(row):  # scored with its image (exporter.inputs.image_rows), for a vision model
                continue
            if "messages" in row:
                if not getattr(tokenizer, "chat_template", None):
                    raise InputError(
                        f"{source} holds chat messages but the model's tokenizer has no chat template; pass plain "
                        "text instead."
                    )
                messages = row["messages"]
                rendered = render_chat(tokenizer, messages)
                sequences.append(tuple(tokenizer(rendered, add_special_tokens=False)["input_ids"][:window]))
                user_turns = [m for m in messages if m.get("role") != "assistant"]
                if messages[-1].get("role") == "assistant" and len(prompts) < n_prompts:
                    prompts.append(
                        tuple(
                            chat_token_ids(
                                tokenizer,
                                messages[:-1] if user_turns else messages,
                                add_generation_prompt=True,
                            )
                        )
                    )
            else:
                add_text(str(row["text"]))
    if not sequences or sum(len(s) - 1 for s in sequences) < MIN_TOKENS:
        raise InputError(
            f"The {label[0]} {source} yields fewer than {MIN_TOKENS} tokens to score. Give {label[1]} more text."
        )
    return EvalData(source, tuple(sequences), tuple(prompts))
