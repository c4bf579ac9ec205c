"""Does generation stop where the chat template ends a turn?

A runtime stops generating at the vocabulary's end-of-generation (eog) tokens. The template decides
which token ends an assistant turn (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`, Gemma `<end_of_turn>`,
id 106, which is not Gemma's `<eos>`, id 1); when that token is not among the GGUF's eog ids, a
runtime that stops on eog only runs on past the answer. Here the terminator is read off the template
(the first special token after an assistant message), looked up in the GGUF's vocabulary as llama.cpp
loads it (eos, eot, eog ids), and a bounded greedy generation checks that the model actually stops.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.child import child_main, run_child

MARKER = "QxAnswerQx"
_SPECIAL = re.compile(r"<\|?[A-Za-z_/][\w./-]*\|?>|</s>|\[/?INST\]")


def turn_terminator(
    render: Callable[[list[dict[str, str]], bool], str], special_tokens: Collection[str] = ()
) -> str | None:
    """The token that closes an assistant turn in a template (`render(messages, add_generation_prompt)`),
    or None when none follows the assistant's text."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": MARKER}]
    try:
        text = render(messages, False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation has no terminator to read
        return None
    tail = text[text.find(MARKER) + len(MARKER) :].lstrip() if MARKER in text else ""
    for token in sorted(special_tokens, key=len, reverse=True):
        if token and tail.startswith(token):
            return token
    match = _SPECIAL.match(tail)
    return match.group(0) if match else None


@dataclass(frozen=True)
class StopCheck:
    """The template's turn terminator against the GGUF's end-of-generation tokens, and a real generation."""

    terminator: str | None
    terminator_ids: tuple[int, ...]
    terminator_is_eog: bool
    eos: str | None
    eot: str | None
    eog: tuple[str, ...]
    stopped: bool  # the bounded greedy generation ended at an eog token
    stop_token: str | None
    generated_tokens: int
    max_tokens: int

    @property
    def passed(self) -> bool:
        return self.terminator_is_eog and self.stopped

    def summary(self, name: str) -> str:
        if self.terminator is None:
            where = "the template writes no turn terminator"
        elif self.terminator_is_eog:
            where = f"the template's turn terminator {self.terminator} is an end-of-generation token"
        else:
            where = (
                f"the template ends turns with {self.terminator}, which is NOT among the GGUF's end-of-generation "
                f"tokens ({', '.join(self.eog) or 'none'}): runtimes that stop on those only will run on"
            )
        ran = (
            f"stopped at {self.stop_token} after {self.generated_tokens} tokens"
            if self.stopped
            else f"did not stop within {self.max_tokens} tokens"
        )
        return f"{name}: {where}; a greedy chat reply {ran}"


def check_stops(gguf: Path, terminator: str | None, prompt: str, max_tokens: int = 64) -> StopCheck:
    """Look the terminator up in the GGUF and generate (greedy, at most `max_tokens`) from `prompt`."""
    request = {
        "gguf": str(gguf),
        "terminator": terminator,
        "prompt": prompt,
        "max_tokens": max_tokens,
        # Half the cores: a short generation gains little from more threads, and spinning thread pools
        # cost a shared CPU dearly (2 threads on 2 busy cores took 25 times the CPU time of 1).
        "threads": max(1, (os.cpu_count() or 2) // 2),
    }
    response = run_child("converters.stop_tokens", request, f"Checking where {gguf.name} stops")
    return StopCheck(
        terminator,
        tuple(response["terminator_ids"]),
        bool(response["terminator_is_eog"]),
        response["eos"],
        response["eot"],
        tuple(response["eog"]),
        bool(response["stopped"]),
        response["stop_token"],
        int(response["generated_tokens"]),
        max_tokens,
    )


def _piece(llm: Any, token: int) -> str:
    return str(llm.detokenize([token], special=True).decode("utf-8", errors="replace"))


def _check(request: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    from converters.llama_runtime import _load

    prompt_probe = request["prompt"].encode("utf-8")
    llm = _load({"gguf": request["gguf"], "n_ctx": 512, "threads": request["threads"]})
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eog = [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    ids = (
        llm.tokenize(request["terminator"].encode("utf-8"), add_bos=False, special=True)
        if request["terminator"]
        else []
    )
    named = {}
    for key, token in (("eos", llama_cpp.llama_vocab_eos(vocab)), ("eot", llama_cpp.llama_vocab_eot(vocab))):
        named[key] = _piece(llm, token) if token >= 0 else None
    prompt = llm.tokenize(prompt_probe, add_bos=True, special=True)
    llm.reset()
    llm.eval(prompt)
    generated, stop_token = 0, None
    for _ in range(int(request["max_tokens"])):
        if llm.n_tokens >= llm.n_ctx():
            break
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            stop_token = _piece(llm, token)
            break
        generated += 1
        llm.eval([token])
    return {
        "terminator_ids": ids,
        "terminator_is_eog": len(ids) == 1 and ids[0] in eog,
        **named,
        "eog": [_piece(llm, t) for t in eog],
        "stopped": stop_token is not None,
        "stop_token": stop_token,
        "generated_tokens": generated,
    }


if __name__ == "__main__":
    child_main(_check)
