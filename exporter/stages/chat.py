"""chat and parity: the chat template translated for Ollama and verified, and the tokenizer of the
GGUF compared with the Hugging Face tokenizer it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from exporter import __version__
from exporter.errors import StageError
from exporter.modelfile import ChatSpec, chat_spec
from exporter.run import Run
from exporter.stage_keys import chat_key, parity_key
from exporter.tokenizer_parity import PARITY_CHECKS, ParityReport, check_tokenizer_parity


@dataclass(frozen=True)
class ChatRecord:
    """The verified translation (Ollama TEMPLATE, stops, parameters) and the Jinja template it came from."""

    spec: ChatSpec
    template: str | None
    key: str


def chat_stage(run: Run, merge_key: str, model_dir: Path, name: str = "chat") -> ChatRecord:
    """The chat-template translation of a merged folder (cached: loading the tokenizer and rendering
    the probe conversations costs seconds)."""

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        spec = chat_spec(model_dir, tokenizer=tokenizer)
        meta.update(spec=asdict(spec), chat_template=tokenizer.chat_template or None, what="chat template")

    key = chat_key(merge_key, __version__)
    entry = run.stage(name, "chat", key, produce)
    spec = entry.meta["spec"]
    return ChatRecord(ChatSpec(**{**spec, "stops": tuple(spec["stops"])}), entry.meta["chat_template"], key)


def parity_stage(
    run: Run, convert_key: str, model_dir: Path, gguf: Path, name: str = "parity"
) -> ParityReport:
    """Tokenizer parity of a merged folder and its 16-bit GGUF (every quantization carries the same
    vocabulary, so one check covers them all)."""

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        meta.update(parity=check_tokenizer_parity(model_dir, gguf).to_json(), what="tokenizer parity")

    entry = run.stage(name, "parity", parity_key(convert_key, __version__, PARITY_CHECKS), produce)
    recorded = {k: v for k, v in entry.meta["parity"].items() if k != "passed"}
    report = ParityReport(**recorded)
    error = report.added_token_error()
    if error:
        raise StageError(f"{gguf.name}: {error}")
    return report
