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

from converters.chat_template import VERIFY_CONVERSATIONS
from converters.gguf_header import GGUFHeader, read_gguf_header
from converters.llama_runtime import tokenize_with_llama_cpp
from exporter.errors import StageError

PARITY_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnew\n\nlines",
    "Numbers: 3.14159, 1,000,000 and 2024-06-01",
    "Unicode: café, naïve, 日本語, emoji 🎉",
    "code: def f(x):\n    return x ** 2  # square",
]


@dataclass
class ParityReport:
    """What the parity check compared and what differed."""

    texts: int
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    double_bos: bool = False
    adds_bos: bool = False

    @property
    def passed(self) -> bool:
        return not self.mismatches and not self.double_bos

    def summary(self) -> str:
        if self.passed:
            return f"tokenizer parity: HF and llama.cpp agree on all {self.texts} texts"
        parts = (
            [f"{len(self.mismatches)} of {self.texts} texts tokenize differently"] if self.mismatches else []
        )
        if self.double_bos:
            parts.append(
                "double BOS: the chat template writes BOS and the tokenizer adds one too (the Modelfile's TEMPLATE "
                "leaves BOS to the tokenizer; other front ends rendering the GGUF's template get two)"
            )
        return "tokenizer parity: " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def check_tokenizer_parity(model_dir: Path, gguf: Path) -> ParityReport:
    """Compare HF and llama.cpp token ids on plain, special-token and chat-formatted texts."""
    from exporter.hf_tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    specials = [t for t in tokenizer.all_special_tokens if t]
    texts = [*PARITY_TEXTS, " ".join(specials) + " between special tokens"]
    if tokenizer.chat_template:
        texts += [
            str(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
            for m in VERIFY_CONVERSATIONS[:3]
        ]
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
    bos = tokenizer.bos_token_id
    plain, chat = tokenize_with_llama_cpp(gguf, [texts[0], texts[-1]], add_special=True)
    report.adds_bos = bos is not None and len(plain) > len(ours[0]) and plain[0] == bos
    # The chat text is the template's rendering: a BOS it writes plus the one llama.cpp adds makes two.
    report.double_bos = report.adds_bos and bool(tokenizer.chat_template) and chat[:2] == [bos, bos]
    return report


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
