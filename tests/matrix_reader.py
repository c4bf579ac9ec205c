"""Read a merged folder with the installed transformers and score it against a writer's reference.

    python tests/matrix_reader.py MERGED_DIR OUT_DIR_OF_matrix_writer

Prints one JSON object: the versions, the tokenizer class loaded, the token ids of probe texts, the
rope theta the model runs with, and the mean KLD of the merged model from the unmerged reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from converters.metrics import compare_logits

PROBES = ["Hello 123 world", "<|im_start|>user\nWhat is 5 plus 7?<|im_end|>\n", "  spaced\ttabs\nand ünïcode"]


def main(merged: Path, written: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    evaluation = json.loads((written / "eval.json").read_text())
    reference = np.load(written / "reference.npz")
    position, klds = 0, []
    with torch.no_grad():
        for sequence in evaluation["sequences"]:
            ids = np.asarray(sequence)
            logits = model(input_ids=torch.tensor([sequence])).logits[0].float().numpy()
            end = position + len(ids) - 1
            rows = compare_logits(logits, ids, reference["idx"][position:end], reference["lp"][position:end])
            klds.append(rows["kld"])
            position = end
    # inv_freq[i] = theta^(-i/n) for n = head_dim/2 entries: theta read back from what the model runs with
    inv_freq = model.model.rotary_emb.inv_freq
    theta = float(inv_freq[1].double().item() ** -inv_freq.numel())
    print(
        json.dumps(
            {
                "transformers": transformers.__version__,
                "tokenizer_class": type(tokenizer).__name__,
                "ids": [tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROBES],
                "chat_template": bool(tokenizer.chat_template),
                "theta": theta,
                "mean_kld": float(np.concatenate(klds).mean()),
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
