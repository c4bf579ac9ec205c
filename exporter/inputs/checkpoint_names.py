"""The names a base's tensors have in memory, where transformers renames them from those its shards store.

transformers 5 loads some checkpoints under other names than the files hold (its checkpoint conversion
mapping): Gemma-3's vision-language checkpoints store `language_model.model.layers.N…` and
`vision_tower.vision_model.…`, which load as `model.language_model.layers.N…` and `model.vision_tower.…`.
An adapter trained under transformers 5 names its modules as they are in memory; the merge writes the
base's own (stored) names. This asks transformers itself, on a model built on the meta device, how each
stored name is renamed when loading, so that the two are matched as transformers matches them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def memory_to_stored(base_dir: Path, stored: frozenset[str]) -> dict[str, str]:
    """In-memory name → stored name, for the `stored` tensors of the base at `base_dir` that transformers
    renames when it loads them (empty where it renames none)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    from exporter.inputs.dialects import quiet_transformers
    from exporter.inputs.vision import auto_model_class

    quiet_transformers()
    config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = auto_model_class(base_dir).from_config(config, dtype=torch.float32)
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    in_memory = model.state_dict()
    renamed = {}
    for name in stored:
        loaded, _ = rename_source_key(name, renamings, [], model.base_model_prefix, in_memory)
        if loaded != name and loaded in in_memory:
            renamed[loaded] = name
    return renamed
