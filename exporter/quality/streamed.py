"""The unmerged reference with its base read one decoder layer at a time, so its memory does not grow with the model.

The model is transformers' own (its module classes do every layer's forward) with PEFT's adapter injected the
way `PeftModel.from_pretrained` does, but built on the meta device: the base weights stay in the shards.
A hook before each decoder layer, the input embedding and the output head reads that module's base weights
from the shards (in the reference dtype; a QLoRA adapter's 4-bit layers through bitsandbytes' round trip),
and a hook after it frees them. The adapter's own tensors are small and stay loaded.

    windows ─▶ embed ─▶ layer 0 ─▶ … ─▶ layer N-1 ─▶ norm ─▶ hidden states      (four windows at a time)
                                                               └─▶ head, one window at a time ─▶ log-probs

The evaluation windows go through a layer four at a time (right-padded, with their attention mask), with the
adapter and then without it, so each layer is read twice per group of windows; the
output head runs one window at a time through the CausalLM's own forward (its logit scaling and
soft-capping included). Peak ≈ the largest of (one layer, the embedding, the head) in the reference dtype
+ the hidden states of the windows + one window's logits.

A base is streamed only when every base parameter is one stored tensor of the same shape (or tied to one);
otherwise (experts that transformers fuses when loading, a vocabulary the adapter resized) the caller
loads the whole model, as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.inputs.adapter import LoraAdapter
from exporter.inputs.safetensors_header import base_shard_files, read_header
from exporter.inputs.trained_on import TrainedOn
from exporter.inputs.vision import is_vision_language

# PEFT wraps a base module and keeps the original under one of these names
_WRAPPERS = re.compile(r"\.(base_layer|original_module)(?=\.)")
_PEFT_PREFIX = "base_model.model."
BATCH_WINDOWS = 4  # windows that go through a layer together: 16 doubled the demo's peak for 30 % less time


@dataclass
class StreamedWeights:
    """Where each base parameter is stored, and the hooks that load a module's base weights for its forward."""

    stored: dict[str, tuple[Path, tuple[int, ...]]]  # checkpoint name → (shard, shape)
    tied: dict[str, str]  # a tied parameter's name → the stored one it shares
    dtype: Any  # torch dtype of the reference
    device: str
    rounded: set[str] = field(default_factory=set)  # QLoRA: weights seen through the 4-bit round trip
    trained_on: TrainedOn | None = None

    def source(self, name: str) -> str:
        """The checkpoint name of a PEFT-wrapped model's base parameter."""
        plain = _WRAPPERS.sub("", name.removeprefix(_PEFT_PREFIX))
        return self.tied.get(plain, plain)

    def read(self, name: str) -> Any:
        from safetensors import safe_open

        source = self.source(name)
        # opened for each read: a shard kept open stays mapped, and every page read would stay resident
        with safe_open(str(self.stored[source][0]), "pt", device="cpu") as tensors:
            tensor = tensors.get_tensor(source)
        if source in self.rounded and self.trained_on is not None:
            import torch

            from exporter.qlora.round_trip import round_trip

            tensor = round_trip(tensor, self.trained_on).to(getattr(torch, self.trained_on.compute_dtype))
        return tensor.to(device=self.device, dtype=self.dtype)

    def load(self, prefix: str, module: Any) -> None:
        """Give `module` (named `prefix` in the model) its base weights."""
        for name, parameter in list(module.named_parameters()):
            if parameter.device.type == "meta":
                assign(module, name, self.read(f"{prefix}{name}"))

    def free(self, prefix: str, module: Any) -> None:
        """Put `module`'s base weights back on the meta device (the adapter's tensors stay)."""
        for name, parameter in list(module.named_parameters()):
            if self.source(f"{prefix}{name}") in self.stored and parameter.device.type != "meta":
                assign(module, name, parameter.to("meta"))

    def stream(self, prefix: str, module: Any) -> None:
        """Load `module`'s base weights before each forward and free them after it."""
        module.register_forward_pre_hook(lambda m, _args: self.load(prefix, m))
        module.register_forward_hook(lambda m, _args, _out: self.free(prefix, m))


def assign(module: Any, name: str, tensor: Any) -> None:
    """Make `tensor` the parameter `name` (dotted, under `module`), replacing what was there."""
    import torch

    owner, _, leaf = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    target._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


def stored_tensors(base_dir: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor of the base's shards: name → (shard, shape), from the headers alone."""
    stored: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for shard in base_shard_files(base_dir):
        for entry in read_header(shard):
            stored[entry.name] = (shard, tuple(entry.shape))
    return stored


def streams(base_dir: Path, adapters: list[LoraAdapter]) -> bool:
    """Whether the reference can read this base layer by layer, decided from the files before any model is
    built: no experts that transformers fuses from per-expert tensors when loading, and no vocabulary the
    adapter resized or whose rows it trains in place (those need the base rows while PEFT builds its layers),
    and no KaSA adapter (PEFT truncates the base weight by SVD as it builds the layer, so the layer's weight
    is not the one in the shards)."""
    from exporter.inputs.base_config import read_base_config
    from exporter.inputs.fused_experts import fused_layouts
    from exporter.inputs.tokenizer_files import saved_vocab_rows

    config = read_base_config(base_dir)
    if is_vision_language(config):  # its vision tower and projector are read whole, with the language model
        return False
    layout = fused_layouts().get(str(config.get("model_type")))
    if layout is not None and any("{expert}" in n for names in layout.stored.values() for n in names):
        return False
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    for adapter in adapters:
        rows = saved_vocab_rows(adapter)
        if (rows is not None and rows != vocab) or adapter.config.get("trainable_token_indices"):
            return False
        if adapter.config.get("kasa_config") is not None:
            return False
    return True


def empty_base(base_dir: Path, trust_remote_code: bool) -> Any:
    """transformers' model of the base with every parameter on the meta device (buffers, such as the rotary
    embedding's frequencies, computed as usual)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        str(base_dir), trust_remote_code=trust_remote_code, local_files_only=True
    )
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    return model


def unstreamable(model: Any, weights: StreamedWeights) -> str | None:
    """Why the PEFT-wrapped meta model cannot read its base from the shards tensor by tensor, or None."""
    for name, parameter in model.named_parameters():
        if parameter.device.type != "meta":
            continue
        source = weights.source(name)
        if source not in weights.stored:
            return f"{source} is not a stored tensor (transformers builds it when loading)"
        if weights.stored[source][1] != tuple(parameter.shape):
            shape = weights.stored[source][1]
            return f"{source} is stored as {list(shape)} and used as {list(parameter.shape)}"
    return None


def load_adapter_tensors(model: Any, adapters: list[LoraAdapter]) -> None:
    """The adapters' own tensors, assigned where PEFT left them on the meta device (it creates them on the
    device of the base layer they wrap)."""
    import torch
    from peft.utils import load_peft_weights

    for index, adapter in enumerate(adapters):
        saved = load_peft_weights(str(adapter.path), device="cpu")
        marker = re.compile(rf"\.a{index}(?=\.|$)")
        for name, parameter in list(model.named_parameters()):
            if parameter.device.type != "meta" or not marker.search(name):
                continue
            key = marker.sub("", name)
            if key in saved:
                assign(model, name, saved[key].to(dtype=torch.float32))


def stream_layers(model: Any, weights: StreamedWeights) -> int:
    """Hooks on every decoder layer, the input embedding and the output head; every other base parameter
    (norms, small heads) is loaded once. Returns the number of streamed modules."""
    causal = model.get_base_model()
    body = getattr(causal, causal.base_model_prefix)
    layers = next(
        (m for m in body.children() if m.__class__.__name__ == "ModuleList" and len(m) > 0),
        None,
    )
    streamed: list[Any] = list(layers) if layers is not None else []
    streamed += [causal.get_input_embeddings(), causal.get_output_embeddings()]
    streamed = [m for m in streamed if m is not None]
    names = {id(module): name for name, module in model.named_modules()}
    inside = {id(p) for m in streamed for p in m.parameters()}
    for module in streamed:
        weights.stream(f"{names[id(module)]}.", module)
    rest = [
        (name, p) for name, p in model.named_parameters() if id(p) not in inside and p.device.type == "meta"
    ]
    for name, _ in rest:
        assign(model, name, weights.read(name))
    return len(streamed)


def window_log_probs(
    model: Any,
    sequences: tuple[tuple[int, ...], ...],
    device: str,
    adapted: bool = True,
    base: bool = True,
) -> Iterator[tuple[Any, Any]]:
    """Each window's log-probabilities (numpy, tokens × vocabulary) with the adapter and without it (None
    for a pass not asked for)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from converters.metrics import log_softmax

    causal = model.get_base_model()
    prefix = causal.base_model_prefix
    body = getattr(causal, prefix)

    class Hidden(torch.nn.Module):
        """Stands in for the decoder during the head's forward: returns one window's hidden states."""

        def __init__(self, hidden: Any, kind: type):
            super().__init__()
            self.hidden, self.kind = hidden, kind

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.kind(last_hidden_state=self.hidden)  # the decoder's own output class (MoE ones too)

    kind: type = BaseModelOutputWithPast

    def head(hidden: Any, ids: Any) -> Any:
        setattr(causal, prefix, Hidden(hidden, kind))
        try:
            return log_softmax(causal(input_ids=ids).logits[0].float().cpu().numpy())
        finally:
            setattr(causal, prefix, body)

    for start in range(0, len(sequences), BATCH_WINDOWS):
        group = sequences[start : start + BATCH_WINDOWS]
        length = max(len(s) for s in group)
        ids = torch.zeros((len(group), length), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(group):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        with_adapter = without = None
        if adapted:
            output = body(input_ids=ids, attention_mask=mask)
            kind, with_adapter = type(output), output.last_hidden_state
        if base:
            with model.disable_adapter():
                output = body(input_ids=ids, attention_mask=mask)
                kind, without = type(output), output.last_hidden_state
        for row, sequence in enumerate(group):
            n = len(sequence)
            window = ids[row : row + 1, :n]
            adapted_lp = base_lp = None
            if with_adapter is not None:
                adapted_lp = head(with_adapter[row : row + 1, :n], window)
            if without is not None:
                with model.disable_adapter():
                    base_lp = head(without[row : row + 1, :n], window)
            yield adapted_lp, base_lp


def confirmed_greedy(
    model: Any,
    prompts: tuple[tuple[int, ...], ...],
    drafts: list[list[int]],
    max_new_tokens: int,
    stops: set[int],
    device: str,
) -> tuple[list[list[int]], int]:
    """The model's greedy continuations (with the adapter) from drafts, as speculative decoding finds them:
    one pass runs every prompt followed by its draft through the model teacher-forced (every layer read once
    for all prompts) and keeps each draft up to the first token the model would not have chosen, then the
    model's own token there; an answer the pass did not finish is decoded on from there (batched_greedy).
    The tokens are the model's greedy ones whatever the draft; a good draft (a 16-bit GGUF of the same
    model) needs the one pass where decoding reads every layer once per token. Returns the continuations
    and how many of them were decoded on."""
    known: list[list[int]] = [[] for _ in prompts]
    finished: set[int] = set()
    sequences = tuple((*p, *d[:max_new_tokens]) for p, d in zip(prompts, drafts, strict=True))
    for i, (log_probs, _) in enumerate(window_log_probs(model, sequences, device, base=False)):
        top = log_probs.argmax(axis=-1)
        for step in range(max_new_tokens):
            token = int(top[len(prompts[i]) - 1 + step])
            if token in stops:
                finished.add(i)
                break
            known[i].append(token)
            if len(known[i]) == max_new_tokens:
                finished.add(i)
            if len(known[i]) == max_new_tokens or step >= len(drafts[i]) or token != drafts[i][step]:
                break  # the model's own token ends what the pass confirms
    rest = [i for i in range(len(prompts)) if i not in finished]
    if rest:
        longest = max(max_new_tokens - len(known[i]) for i in rest)
        decoded = batched_greedy(model, tuple((*prompts[i], *known[i]) for i in rest), longest, device)
        for i, more in zip(rest, decoded, strict=True):
            known[i] += more[: max_new_tokens - len(known[i])]
    return known, len(rest)


def stop_ids(model: Any) -> list[int]:
    """The tokens that end a greedy answer: the generation config's end-of-sequence ids."""
    stops = model.generation_config.eos_token_id
    return [] if stops is None else (list(stops) if isinstance(stops, list) else [stops])


def batched_greedy(
    model: Any, prompts: tuple[tuple[int, ...], ...], max_new_tokens: int, device: str
) -> list[list[int]]:
    """Greedy continuations of every prompt in one left-padded batch, so each streamed layer is read once per
    generated token rather than once per prompt and token. Each continuation ends before its first stop token."""
    import torch

    stops = stop_ids(model)
    pad = stops[0] if stops else 0
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
    )
    continuations = []
    for row in out[:, length:].tolist():
        cut = next((i for i, token in enumerate(row) if token in stops), len(row))
        continuations.append(row[:cut])
    return continuations
