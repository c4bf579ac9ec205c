"""Merge PEFT adapters into a 16-bit base, tensor by tensor, without loading the whole model.

For every base tensor an adapter touches, the updates are applied in fp32 in the order the adapters
were given, and the result is cast to the output dtype:

- LoRA (Linear, Conv1D with fan_in_fan_out, Embedding): W + w·s·B·A, with PEFT's scaling s
  (alpha/r, alpha/√r for rsLoRA, rank_pattern and alpha_pattern);
- LoRA on transformers 5's fused MoE experts (PEFT target_parameters): each expert's slice of A and B onto
  the per-expert tensors on disk (or the fused 3-D tensor, where the model stores it so);
- DoRA: m / ‖W + ΔW‖_row · (W + ΔW), the norm taken per output row as PEFT computes it;
- trained LoRA biases (lora_bias): b + w·s·b_B;
- IA3: W ⊙ l (and the bias of non-feedforward layers);
- modules_to_save and trained biases (bias="all"/"lora_only"): the adapter's full tensor;
- a changed vocabulary (added tokens, resized embeddings, trainable_token_indices): see merge.vocab.

Tensors are read with plain file reads and written into shards whose headers are planned up
front (exporter.inputs.safetensors_io), so the working set is a few copies of the largest tensor,
whatever the model's size. Everything is checked before any output is written, every merged
tensor must be finite and must differ from the base where its update is non-zero, and the output folder
appears only when complete.

The package, in the order a merge runs:

- updates: the kinds of update (LoRA, DoRA, KaSA, LoRA bias, IA3, replacement), the MergePlan and the
  record of where each adapter's tensors went;
- lora_layout: PEFT's scaling, Conv1D orientation and BD-LoRA packing of a LoRA's matrices;
- experts: fused MoE expert parameters mapped onto the tensors on disk (data/fused_experts.toml);
- coverage: the check, as the merge writes, that every targeted tensor changed, and the ledger it keeps;
- adapter_plan: one adapter's updates, checked against the base's tensor names and shapes;
- plan: the base (BaseModel) and plan_merge over every adapter, with tied embeddings;
- vocab: resized vocabularies and trained token rows;
- write: merge_adapters, which streams the base through the plan into the merged folder.
"""

from __future__ import annotations

from exporter.merge.adapter_plan import PEFT_PREFIX, plan_adapter
from exporter.merge.lora_layout import lora_scale
from exporter.merge.plan import BaseModel, plan_merge
from exporter.merge.updates import (
    AddUpdate,
    KasaUpdate,
    LoraUpdate,
    MergePlan,
    Replacement,
    ScaleUpdate,
    TokenRows,
    Update,
)
from exporter.merge.vocab import EMBEDDING_NAMES, OUTPUT_NAME
from exporter.merge.write import DTYPES, PROVENANCE_FILE, TOKENIZER_FILES, merge_adapters

__all__ = [
    "DTYPES",
    "EMBEDDING_NAMES",
    "OUTPUT_NAME",
    "PEFT_PREFIX",
    "PROVENANCE_FILE",
    "TOKENIZER_FILES",
    "AddUpdate",
    "BaseModel",
    "KasaUpdate",
    "LoraUpdate",
    "MergePlan",
    "Replacement",
    "ScaleUpdate",
    "TokenRows",
    "Update",
    "lora_scale",
    "merge_adapters",
    "plan_adapter",
    "plan_merge",
]
