"""Evaluate GGUF files with llama-cpp-python, always in a child process.

A quantized GGUF can crash llama.cpp natively (on AMX CPUs the repacking buffer types segfault in
decode), so evaluation never runs in the CLI's own process. The child also turns off llama.cpp's
extra buffer types by default: the crash depends on the CPU and the build, the speed they buy is
small for evaluation, and EDGE_EXPORT_EXTRA_BUFTS=1 turns them back on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converters.child import child_main, run_child


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def needs_extra_bufts_workaround() -> bool:
    """True on CPUs with AMX, where llama.cpp's extra (repacking) buffer types crash in decode."""
    return any(flag.startswith("amx") for flag in cpu_flags())


def greedy_generate(
    gguf: Path,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    n_ctx: int = 512,
    threads: int | None = None,
) -> list[list[int]]:
    """Greedy continuations (token ids, up to an end-of-generation token) of each prompt."""
    request = {
        "op": "generate",
        "gguf": str(gguf),
        "prompts": [list(p) for p in prompts],
        "max_new_tokens": max_new_tokens,
        "n_ctx": n_ctx,
        "threads": threads or os.cpu_count() or 1,
    }
    response = run_child("converters.llama_runtime", request, f"Evaluating {gguf.name} with llama.cpp")
    return [list(map(int, ids)) for ids in response["continuations"]]


def _load(request: dict[str, Any]) -> Any:
    import llama_cpp
    import llama_cpp.llama as llama_module

    if os.environ.get("EDGE_EXPORT_EXTRA_BUFTS") != "1":
        default_params = llama_cpp.llama_model_default_params

        def params_without_extra_bufts() -> Any:
            params = default_params()
            params.use_extra_bufts = False
            return params

        # Llama() builds its model params from this function and offers no argument for the field.
        llama_module.llama_cpp.llama_model_default_params = params_without_extra_bufts
    return llama_cpp.Llama(
        model_path=request["gguf"],
        n_ctx=int(request["n_ctx"]),
        n_batch=int(request["n_ctx"]),
        n_threads=int(request["threads"]),
        n_threads_batch=int(request["threads"]),
        logits_all=True,
        verbose=False,
        seed=0,
    )


def _generate(request: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    llm = _load(request)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    continuations = []
    for prompt in request["prompts"]:
        llm.reset()
        llm.eval(prompt)
        generated: list[int] = []
        for _ in range(int(request["max_new_tokens"])):
            if llm.n_tokens >= llm.n_ctx():
                break
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            generated.append(token)
            llm.eval([token])
        continuations.append(generated)
    return {"continuations": continuations}


_OPERATIONS = {"generate": _generate}

if __name__ == "__main__":
    child_main(lambda request: _OPERATIONS[request["op"]](request))
