"""Tokenizer parity: the HF tokenizer's token ids against llama.cpp's for the same GGUF.

Ollama and llama.cpp tokenize with the vocabulary embedded in the GGUF, while the model was trained
with the HF tokenizer. Added tokens lost in conversion or different whitespace handling show up
here as different ids. The chat-formatted texts also catch a double BOS: a template that writes
BOS itself, tokenized by a tokenizer that adds one too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from converters.gguf_header import GGUFHeader, read_gguf_header
from converters.llama_runtime import detokenize_with_llama_cpp, tokenize_with_llama_cpp
from exporter.core.errors import StageError
from exporter.deploy.chat_template import VERIFY_CONVERSATIONS, Message
from exporter.inputs.dialects import render_chat

PARITY_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnew\n\nlines",
    "Numbers: 3.14159, 1,000,000 and 2024-06-01",
    "Unicode: café, naïve, 日本語, emoji 🎉",
    "code: def f(x):\n    return x ** 2  # square",
]
# What the check covers; part of its cache key (3: every added token that text can hold, and the
# highest-id special ones, alone and inside text, both ways).
PARITY_CHECKS = 3
# Special added tokens checked (the highest ids: tokens a fine-tune added come last); Gemma has thousands
# of unused ones. Every added token that is not special is checked: plain text can hold it.
MAX_SPECIAL_TOKENS = 2000


@dataclass
class ParityReport:
    """What the parity check compared and what differed."""

    texts: int
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    double_bos: bool = False
    adds_bos: bool = False
    added_tokens: int = 0
    added_mismatches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.mismatches and not self.double_bos and not self.added_mismatches

    def summary(self) -> str:
        if self.passed:
            added = (
                f" and all {self.added_tokens} added tokens (alone, in text, both ways)"
                if self.added_tokens
                else ""
            )
            return f"tokenizer parity: HF and llama.cpp agree on all {self.texts} texts{added}"
        parts = (
            [f"{len(self.mismatches)} of {self.texts} texts tokenize differently"] if self.mismatches else []
        )
        if self.double_bos:
            parts.append(
                "double BOS: the chat template writes BOS and the tokenizer adds one too (the Modelfile's TEMPLATE "
                "leaves BOS to the tokenizer; other front ends rendering the GGUF's template get two)"
            )
        if self.added_mismatches:
            parts.append(f"{len(self.added_mismatches)} of {self.added_tokens} added tokens differ")
        return "tokenizer parity: " + "; ".join(parts)

    def added_token_error(self, new_from: int | None = None) -> str | None:
        """Why the GGUF's vocabulary cannot stand for the model's tokenizer, or None. With `new_from` (the
        base tokenizer's size) only the tokens an adapter added count: a base's own added tokens that
        llama.cpp reads differently are the base's property, reported by the summary."""
        lost = [m for m in self.added_mismatches if new_from is None or m["id"] >= new_from]
        if not lost:
            return None
        shown = "; ".join(f"{m['token']!r} (id {m['id']}): {m['what']}" for m in lost[:5])
        return (
            f"The GGUF's vocabulary loses added tokens: {shown}. llama.cpp would split or misread them, so the "
            "model could not see or write them. Check that the tokenizer saved with the adapter lists them in "
            "tokenizer.json's added_tokens, and report this with the tokenizer files if it does."
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def check_tokenizer_parity(model_dir: Path, gguf: Path) -> ParityReport:
    """Compare HF and llama.cpp token ids on plain, special-token and chat-formatted texts."""
    from exporter.inputs.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    specials = [t for t in tokenizer.all_special_tokens if t]
    texts = [*PARITY_TEXTS, " ".join(specials) + " between special tokens"]
    if tokenizer.chat_template:
        texts += [text for m in VERIFY_CONVERSATIONS[:3] if (text := _chat_text(tokenizer, m)) is not None]
    hf = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ours = tokenize_with_llama_cpp(gguf, texts, add_special=False)
    report = ParityReport(texts=len(texts))
    for text, expected, got in zip(texts, hf, ours, strict=True):
        if list(expected) != got:
            at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), None)
            at = min(len(expected), len(got)) if at is None else at
            report.mismatches.append(
                {
                    "text": text[:200],
                    "position": at,
                    "hf": list(expected[at : at + 8]),
                    "llama.cpp": got[at : at + 8],
                }
            )
    report.added_tokens, report.added_mismatches = _added_token_parity(tokenizer, gguf)
    bos = tokenizer.bos_token_id
    plain, chat = tokenize_with_llama_cpp(gguf, [texts[0], texts[-1]], add_special=True)
    report.adds_bos = bos is not None and len(plain) > len(ours[0]) and plain[0] == bos
    # The chat text is the template's rendering: a BOS it writes plus the one llama.cpp adds makes two.
    report.double_bos = report.adds_bos and bool(tokenizer.chat_template) and chat[:2] == [bos, bos]
    return report


def _chat_text(tokenizer: Any, messages: list[Message]) -> str | None:
    """The template's rendering of `messages` (the assistant's turn opened), None where the template refuses
    the conversation (Gemma's and Mistral's raise on a system message)."""
    from jinja2.exceptions import TemplateError

    try:
        return render_chat(tokenizer, messages, True)
    except TemplateError:
        return None


def _added_token_parity(tokenizer: Any, gguf: Path) -> tuple[int, list[dict[str, Any]]]:
    """Each added token alone and inside text: llama.cpp must give it the tokenizer's id, and turn that id
    (and the text's ids) back into the same text."""
    tokens = sorted(((i, t) for i, t in tokenizer.added_tokens_decoder.items() if t.content), reverse=True)
    special = [(i, t.content) for i, t in tokens if t.special][:MAX_SPECIAL_TOKENS]
    added = sorted([(i, t.content) for i, t in tokens if not t.special] + special, reverse=True)
    texts = [text for _, text in added] + [f"ahoy {text} there{text}." for _, text in added]
    hf = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    ours = tokenize_with_llama_cpp(gguf, texts, add_special=False)
    decoded = detokenize_with_llama_cpp(gguf, [[i] for i, _ in added] + hf[len(added) :])
    mismatches: list[dict[str, Any]] = []
    for index, (token_id, text) in enumerate(added):
        inside = len(added) + index
        what = None
        if ours[index] != [token_id] or hf[index] != [token_id]:
            what = f"encodes to {ours[index][:6]} in llama.cpp, {hf[index][:6]} in the tokenizer"
        elif ours[inside] != hf[inside]:
            what = f"inside text, llama.cpp gives {ours[inside][:12]} where the tokenizer gives {hf[inside][:12]}"
        elif decoded[index] is None:
            what = "its id is past the GGUF's vocabulary"
        elif decoded[index] != text:
            what = f"llama.cpp decodes it as {decoded[index]!r}"
        elif decoded[inside] != tokenizer.decode(hf[inside], skip_special_tokens=False):
            what = f"inside text, llama.cpp decodes {texts[inside]!r} as {decoded[inside]!r}"
        if what:
            mismatches.append({"token": text, "id": token_id, "what": what})
    return len(added), mismatches


def check_embedded_chat_template(
    expected: str | None, model_dir: Path, ggufs: list[Path], headers: dict[Path, GGUFHeader] | None = None
) -> None:
    """Every GGUF must carry the chat template (`expected`, from the merged model's tokenizer in
    `model_dir`) that the Modelfile uses; `headers` are ones already read (e.g. recorded in the cache)."""
    for gguf in ggufs:
        header = (headers or {}).get(gguf) or read_gguf_header(gguf)
        embedded = header.chat_template or None
        if embedded != (expected or None):
            raise StageError(
                f"{gguf} embeds a different chat template (tokenizer.chat_template) from the merged model's "
                f"tokenizer in {model_dir}; the GGUF and the Modelfile would format chats differently. This is a "
                "bug in the conversion: please report it with both templates."
            )
