"""Evaluate GGUF files with llama-cpp-python, always in a child process.

A quantized GGUF can crash llama.cpp natively (on AMX CPUs the repacking buffer types segfault in
decode), so evaluation never runs in the CLI's own process. The child also turns off llama.cpp's
extra buffer types by default: the crash depends on the CPU and the build, the speed they buy is
small for evaluation, and EDGE_EXPORT_EXTRA_BUFTS=1 turns them back on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from converters.child import ChildInputError, child_main, run_child


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
    lora: Path | None = None,
) -> list[list[int]]:
    """Greedy continuations (token ids, up to an end-of-generation token) of each prompt; with `lora`,
    a GGUF LoRA applied at scale 1."""
    request = {
        "op": "generate",
        "gguf": str(gguf),
        "prompts": [list(p) for p in prompts],
        "max_new_tokens": max_new_tokens,
        "n_ctx": n_ctx,
        "threads": threads or os.cpu_count() or 1,
        "lora": str(lora) if lora else None,
    }
    response = run_child("converters.llama_runtime", request, f"Evaluating {gguf.name} with llama.cpp")
    return [list(map(int, ids)) for ids in response["continuations"]]


def score_gguf(
    gguf: Path,
    sequences: Sequence[Sequence[int]],
    reference_file: Path,
    output_file: Path,
    prompts: Sequence[Sequence[int]] = (),
    max_new_tokens: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    lora: Path | None = None,
) -> dict[str, Any]:
    """Evaluate `gguf` on the sequences against a reference file (exporter.quality.reference's format).

    With `lora`, a GGUF LoRA is applied at run time on top of `gguf` (scale 1), as Ollama's ADAPTER does.

    The child writes per-position kld / same_top / nll arrays to `output_file` (npz) and returns the
    greedy continuations of `prompts` and its evaluation time.
    """
    n_ctx = max([len(s) for s in sequences] + [len(p) + max_new_tokens for p in prompts])
    request = {
        "op": "score",
        "gguf": str(gguf),
        "sequences": [list(s) for s in sequences],
        "reference": str(reference_file),
        "output": str(output_file),
        "prompts": [list(p) for p in prompts],
        "max_new_tokens": max_new_tokens,
        "n_ctx": n_ctx,
        "threads": threads or os.cpu_count() or 1,
        "device": device,
        "lora": str(lora) if lora else None,
    }
    what = f"Evaluating {gguf.name}" + (f" with the adapter {lora.name}" if lora else "")
    return run_child("converters.llama_runtime", request, f"{what} with llama.cpp")


def tokenize_with_llama_cpp(gguf: Path, texts: Sequence[str], add_special: bool) -> list[list[int]]:
    """llama.cpp's token ids for each text (special tokens parsed), from the GGUF's vocabulary alone."""
    request = {"op": "tokenize", "gguf": str(gguf), "texts": list(texts), "add_special": add_special}
    response = run_child("converters.llama_runtime", request, f"Tokenizing with {gguf.name}'s vocabulary")
    return [list(map(int, ids)) for ids in response["ids"]]


def detokenize_with_llama_cpp(gguf: Path, sequences: Sequence[Sequence[int]]) -> list[str | None]:
    """llama.cpp's text for each id sequence (special tokens rendered), from the GGUF's vocabulary alone;
    None for a sequence with an id the vocabulary does not have."""
    request = {"op": "tokenize", "gguf": str(gguf), "texts": [], "add_special": False}
    request["sequences"] = [list(map(int, s)) for s in sequences]
    response = run_child("converters.llama_runtime", request, f"Detokenizing with {gguf.name}'s vocabulary")
    return [None if text is None else str(text) for text in response["texts"]]


def _tokenize(request: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=request["gguf"], vocab_only=True, verbose=False)
    add_special = bool(request["add_special"])
    n_vocab = llm.n_vocab()
    return {
        "ids": [llm.tokenize(t.encode("utf-8"), add_bos=add_special, special=True) for t in request["texts"]],
        # An id past the vocabulary crashes llama.cpp's detokenizer: it is reported, not looked up.
        "texts": [
            llm.detokenize(ids, special=True).decode("utf-8", errors="replace")
            if all(0 <= i < n_vocab for i in ids)
            else None
            for ids in request.get("sequences", [])
        ],
    }


def _load(request: dict[str, Any]) -> Any:
    import llama_cpp
    import llama_cpp.llama as llama_module

    device = request.get("device", "cpu")
    if device == "metal" and not llama_cpp.llama_supports_gpu_offload():
        raise ChildInputError(
            "--device metal was asked for, but this llama-cpp-python was built without Metal (or any GPU "
            'offload). Reinstall it with CMAKE_ARGS="-DGGML_METAL=on" on a Mac, or use --device cpu.'
        )

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
        n_gpu_layers=-1 if device == "metal" else 0,
        lora_path=request.get("lora"),
        lora_scale=1.0,
    )


def _generate(request: dict[str, Any], llm: Any = None) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    llm = llm or _load(request)
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


def _score(request: dict[str, Any]) -> dict[str, Any]:
    import time

    import numpy as np

    from converters.metrics import compare_logits

    llm = _load(request)
    reference = np.load(request["reference"])
    idx, lp = reference["idx"], reference["lp"]
    parts: dict[str, list[np.ndarray]] = {"kld": [], "same_top": [], "nll": []}
    position = 0
    start = time.perf_counter()  # the whole scoring loop, metrics included (bench/quality compares it)
    for sequence in request["sequences"]:
        ids = np.asarray(sequence)
        n = len(ids)
        llm.reset()
        llm.eval(sequence)
        logits = np.asarray(llm.scores[:n], dtype=np.float32)
        rows = compare_logits(logits, ids, idx[position : position + n - 1], lp[position : position + n - 1])
        for key, value in rows.items():
            parts[key].append(value)
        position += n - 1
    eval_seconds = time.perf_counter() - start
    if position != len(idx):
        raise ValueError(f"the reference has {len(idx)} positions but the sequences have {position}")
    np.savez(request["output"], **{key: np.concatenate(values) for key, values in parts.items()})
    start = time.perf_counter()
    greedy = _generate(request, llm)["continuations"] if request["prompts"] else []
    generate_seconds = time.perf_counter() - start
    generated = sum(len(g) for g in greedy)
    return {
        "eval_seconds": eval_seconds,
        "tokens": sum(len(s) for s in request["sequences"]),
        "greedy": greedy,
        "generate_seconds": generate_seconds,
        "generated_tokens": generated,
    }


def _raw_eval(request: dict[str, Any]) -> dict[str, Any]:
    """llama-cpp-python's plain eval of the same sequences, nothing else (for bench/quality)."""
    import time

    llm = _load(request)
    start = time.perf_counter()
    for sequence in request["sequences"]:
        llm.reset()
        llm.eval(sequence)
    return {"eval_seconds": time.perf_counter() - start, "tokens": sum(len(s) for s in request["sequences"])}


_OPERATIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "generate": _generate,
    "score": _score,
    "raw_eval": _raw_eval,
    "tokenize": _tokenize,
}

if __name__ == "__main__":
    child_main(lambda request: _OPERATIONS[request["op"]](request))
