"""Score a vision-language GGUF pair (language model + mmproj) on image rows through llama.cpp's multimodal
path (libmtmd), always in a child process.

Per row: the prompt with the image's media marker is tokenized by mtmd (which lays out the image's own
marker tokens and embeddings as llama-server does), evaluated with mtmd's helper (non-causal over the image
where the family needs it), then the answer's tokens are decoded; the logits that predict each answer token
are compared with the reference's. The KV cache after the prompt is then reused for the reference's greedy
answer, whose tokens the GGUF's top-1 must follow. Model weights load without llama.cpp's extra (repacking)
buffer types, as in converters.llama_runtime.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any

from converters.child import ChildInputError, child_main, run_child

N_CTX = 4096  # prompt, image embeddings and answer
# Tokens decoded at once: a non-causal image (Gemma-3's 256 tokens) must fit one batch; the attention's
# scratch grows with it (batch × context × heads), so it stays well below the context for 8B models.
N_BATCH = 1024


def score_image_rows(
    gguf: Path,
    mmproj: Path,
    rows: list[dict[str, Any]],
    reference_file: Path,
    output_file: Path,
    threads: int | None = None,
    lora: Path | None = None,
) -> dict[str, Any]:
    """`rows`: {"image", "prompt" (with "{media}" where the image goes), "add_special", "answer" (token ids),
    "greedy" (the reference's greedy answer)}. The child writes per-position kld / same_top / nll over every
    row's answer tokens to `output_file` and returns, per row, the prompt's text tokens as mtmd tokenized
    them and how many greedy tokens the GGUF's top-1 followed. With `lora`, a GGUF LoRA is applied to the
    language model at scale 1 (the projector takes none)."""
    request = {
        "gguf": str(gguf),
        "mmproj": str(mmproj),
        "rows": rows,
        "reference": str(reference_file),
        "output": str(output_file),
        "threads": threads or os.cpu_count() or 1,
        "lora": None if lora is None else str(lora),
    }
    what = f"Evaluating {gguf.name}" + (f" with the adapter {lora.name}" if lora else "")
    return run_child("converters.mtmd_runtime", request, f"{what} and {mmproj.name} on images")


class _Pair:
    """The language model, its context and the projector's mtmd context, freed together."""

    def __init__(self, request: dict[str, Any]):
        import llama_cpp.llama_cpp as L
        import llama_cpp.mtmd_cpp as M

        self.L, self.M = L, M
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        if os.environ.get("EDGE_EXPORT_EXTRA_BUFTS") != "1":
            params.use_extra_bufts = False
        self.model = L.llama_model_load_from_file(request["gguf"].encode(), params)
        if not self.model:
            raise ChildInputError(f"llama.cpp could not load {request['gguf']}.")
        context = L.llama_context_default_params()
        context.n_ctx = N_CTX
        context.n_batch = context.n_ubatch = N_BATCH
        context.n_threads = context.n_threads_batch = int(request["threads"])
        self.ctx = L.llama_init_from_model(self.model, context)
        self.lora = None
        if request.get("lora") and self.ctx:
            self.lora = L.llama_adapter_lora_init(self.model, request["lora"].encode())
            if not self.lora:
                self.close()
                raise ChildInputError(
                    f"llama.cpp could not load the LoRA {request['lora']} on {request['gguf']}."
                )
            adapters = (L.llama_adapter_lora_p_ctypes * 1)(self.lora)
            L.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        projector = M.mtmd_context_params_default()
        projector.use_gpu, projector.print_timings, projector.warmup = False, False, False
        projector.n_threads = int(request["threads"])
        self.mtmd = M.mtmd_init_from_file(request["mmproj"].encode(), self.model, projector)
        if not self.ctx or not self.mtmd:
            self.close()
            raise ChildInputError(
                f"llama.cpp could not load the projector {request['mmproj']} for {request['gguf']} (the two files "
                "must come from the same export)."
            )
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.marker = M.mtmd_default_marker().decode()

    def close(self) -> None:
        if getattr(self, "mtmd", None):
            self.M.mtmd_free(self.mtmd)
        if getattr(self, "ctx", None):
            self.L.llama_free(self.ctx)
        if getattr(self, "lora", None):
            self.L.llama_adapter_lora_free(self.lora)
        if getattr(self, "model", None):
            self.L.llama_model_free(self.model)

    def logits(self, index: int) -> Any:
        import numpy as np

        return np.ctypeslib.as_array(
            self.L.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,)
        ).copy()

    def prompt(self, row: dict[str, Any]) -> tuple[int, list[int], Any]:
        """Evaluate the prompt with its image: the position after it, its text tokens, the last logits."""
        L, M = self.L, self.M
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        bitmap = M.mtmd_helper_bitmap_init_from_file(self.mtmd, row["image"].encode(), False)
        if not bitmap:
            raise ChildInputError(f"llama.cpp could not read the image {row['image']}.")
        chunks = M.mtmd_input_chunks_init()
        try:
            text = row["prompt"].replace("{media}", self.marker).encode()
            given = M.mtmd_input_text()
            given.text, given.text_len = text, len(text)
            given.add_special, given.parse_special = bool(row["add_special"]), True
            if M.mtmd_tokenize(
                self.mtmd, chunks, ctypes.byref(given), (M.mtmd_bitmap_p_ctypes * 1)(bitmap), 1
            ):
                raise ChildInputError(
                    f"libmtmd could not lay out the prompt of {row['image']} with its image."
                )
            tokens: list[int] = []
            for index in range(M.mtmd_input_chunks_size(chunks)):
                chunk = M.mtmd_input_chunks_get(chunks, index)
                if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t(0)
                    ids = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    tokens += [int(ids[i]) for i in range(count.value)]
            n_past = L.llama_pos(0)
            if M.mtmd_helper_eval_chunks(
                self.mtmd, self.ctx, chunks, 0, 0, N_BATCH, True, ctypes.byref(n_past)
            ):
                raise RuntimeError(f"libmtmd failed to evaluate the prompt of {row['image']}")
            return int(n_past.value), tokens, self.logits(-1)
        finally:
            M.mtmd_input_chunks_free(chunks)
            M.mtmd_bitmap_free(bitmap)

    def decode(self, tokens: list[int], start: int) -> list[Any]:
        """Decode `tokens` from position `start` (the cache beyond it dropped): the logits after each."""
        L = self.L
        L.llama_memory_seq_rm(L.llama_get_memory(self.ctx), 0, start, -1)
        if not tokens:
            return []
        if start + len(tokens) > N_CTX or len(tokens) > N_BATCH:
            raise ChildInputError(
                f"an image row needs more than {N_CTX} positions, or an answer of more than {N_BATCH} tokens; "
                "shorten its answer."
            )
        batch = L.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, 1
            if L.llama_decode(self.ctx, batch):
                raise RuntimeError("llama_decode failed on an answer")
            return [self.logits(i) for i in range(len(tokens))]
        finally:
            L.llama_batch_free(batch)


def _score(request: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from converters.metrics import compare_logits

    reference = np.load(request["reference"])
    idx, lp = reference["idx"], reference["lp"]
    parts: dict[str, list[Any]] = {"kld": [], "same_top": [], "nll": []}
    position, prompts, followed = 0, [], []
    pair = _Pair(request)
    start = time.perf_counter()
    try:
        for row in request["rows"]:
            answer, greedy = [int(t) for t in row["answer"]], [int(t) for t in row["greedy"]]
            n_past, tokens, first = pair.prompt(row)
            logits = np.stack([first, *pair.decode(answer, n_past)]).astype(np.float32)
            ids = np.asarray([0, *answer])  # compare_logits reads ids[1:], the tokens each row predicts
            n = len(answer)
            rows = compare_logits(logits, ids, idx[position : position + n], lp[position : position + n])
            for key, value in rows.items():
                parts[key].append(value)
            position += n
            tops = [int(first.argmax())] + [int(x.argmax()) for x in pair.decode(greedy[:-1], n_past)]
            agreed = next(
                (i for i, (a, b) in enumerate(zip(tops, greedy, strict=False)) if a != b), len(greedy)
            )
            prompts.append(tokens)
            followed.append(agreed)
    finally:
        pair.close()
    if position != len(idx):
        raise ValueError(f"the image reference has {len(idx)} positions but the answers have {position}")
    np.savez(request["output"], **{key: np.concatenate(values) for key, values in parts.items()})
    return {
        "prompt_tokens": prompts,
        "greedy_followed": followed,
        "eval_seconds": time.perf_counter() - start,
    }


if __name__ == "__main__":
    child_main(_score)
