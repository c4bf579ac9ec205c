"""Real torchtune and LLaMA-Factory runs on a tiny SmolLM2-shaped base (its tokenizer, rope and tied
embeddings), each in the trainer's own environment (tests.sideenv.trainer_env), built once per recipe and
cached outside the checkout.

- torchtune 0.6.1, `tune run lora_finetune_single_device` with the HF checkpointer: epoch_0/ holds the PEFT
  adapter (adapter_model.safetensors, adapter_config.json), torchtune's own adapter_model.pt and the model
  torchtune merged itself (model-00001-of-00001.safetensors), beside copies of the base's files. SmolLM2's
  tokenizer is no torchtune tokenizer: a small ModelTokenizer wraps torchtune's HuggingFaceBaseTokenizer.
- LLaMA-Factory 0.9.5, `llamafactory-cli train` (stage sft, LoRA on every linear layer, template `default`,
  which replaces the base's chat template with LLaMA-Factory's own and saves it with the adapter), with
  the transformers 5.6 and PEFT 0.18.1 it pins.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.sideenv import TRAINER_ENVS, trained_run, trainer_env

TORCHTUNE_TOKENIZER = """
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import (
    HuggingFaceBaseTokenizer, ModelTokenizer, tokenize_messages_no_special_tokens,
)


class HFModelTokenizer(ModelTokenizer, Transform):
    def __init__(self, path, config_path, max_seq_len=None):
        self.base = HuggingFaceBaseTokenizer(path, tokenizer_config_json_path=config_path)
        self.bos_id, self.eos_id = self.base.bos_id, self.base.eos_id
        self.pad_id = self.eos_id
        self.max_seq_len = max_seq_len
        self.special_tokens = {}

    @property
    def vocab_size(self):
        return self.base.tokenizer.get_vocab_size()

    def encode(self, text, add_bos=True, add_eos=True):
        return self.base.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, token_ids, **kwargs):
        return self.base.decode(token_ids)

    def tokenize_messages(self, messages, **kwargs):
        return tokenize_messages_no_special_tokens(
            tokenizer=self, messages=messages, bos_id=self.bos_id, eos_id=self.eos_id
        )

    def __call__(self, sample, inference=False):
        sample["tokens"], sample["mask"] = self.tokenize_messages(sample.pop("messages"))
        return sample


def hf_model_tokenizer(path, config_path, max_seq_len=None):
    return HFModelTokenizer(path, config_path, max_seq_len=max_seq_len)
"""


def _chat_texts(base: Path) -> list[str]:
    """The demo chats rendered with the base's chat template: text completion on them trains the turns'
    format too (ChatML and its <|im_end|>), as a chat fine-tune without a torchtune template of its own."""
    from transformers import AutoTokenizer

    from demos.inputs import read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = read_jsonl("demo_train.jsonl")[:16]
    return [str(tokenizer.apply_chat_template(row["messages"], tokenize=False)) for row in rows]


def _cached(name: str, base: Path, recipe: dict[str, Any], build: Callable[[Path], None]) -> Path:
    return trained_run(name, base, {"env": TRAINER_ENVS[name], **recipe}, lambda staging, _: build(staging))


TORCHTUNE_RECIPE = {"rank": 8, "alpha": 16, "steps": 4, "lr": 1e-2, "data": "chatml-text"}


def torchtune_run(base: Path) -> Path:
    """The output_dir of a torchtune LoRA run on `base` (a tied Llama such as SmolLM2, its shape read from its
    config.json); the adapter is in epoch_0/."""

    def build(staging: Path) -> None:
        from exporter.inputs.dialects import read_rope

        env = trainer_env("torchtune")
        checkpoint = shutil.copytree(base, staging / "base")
        (staging / "smol_tok.py").write_text(TORCHTUNE_TOKENIZER)
        (staging / "train.json").write_text(json.dumps([{"text": t} for t in _chat_texts(base)]))
        c = json.loads((base / "config.json").read_text())
        config = {
            "output_dir": str(staging / "out"),
            "model": {
                "_component_": "torchtune.models.llama3_2.lora_llama3_2",
                "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
                "apply_lora_to_mlp": True,
                "apply_lora_to_output": False,
                "vocab_size": c["vocab_size"],
                "num_layers": c["num_hidden_layers"],
                "num_heads": c["num_attention_heads"],
                "num_kv_heads": c["num_key_value_heads"],
                "embed_dim": c["hidden_size"],
                "max_seq_len": min(c["max_position_embeddings"], 2048),
                "intermediate_dim": c["intermediate_size"],
                "norm_eps": c["rms_norm_eps"],
                "rope_base": read_rope(c).theta,
                "scale_factor": 1,  # Llama 3.2's scaled rope with factor 1 is plain rope
                "tie_word_embeddings": True,
                "lora_rank": TORCHTUNE_RECIPE["rank"],
                "lora_alpha": TORCHTUNE_RECIPE["alpha"],
                "lora_dropout": 0.0,
            },
            "tokenizer": {
                "_component_": "smol_tok.hf_model_tokenizer",
                "path": str(checkpoint / "tokenizer.json"),
                "config_path": str(checkpoint / "tokenizer_config.json"),
                "max_seq_len": 256,
            },
            "checkpointer": {
                "_component_": "torchtune.training.FullModelHFCheckpointer",
                "checkpoint_dir": str(checkpoint),
                "checkpoint_files": ["model.safetensors"],
                "recipe_checkpoint": None,
                "output_dir": str(staging / "out"),
                "model_type": "LLAMA3_2",
            },
            "resume_from_checkpoint": False,
            "save_adapter_weights_only": False,
            "dataset": {
                "_component_": "torchtune.datasets.text_completion_dataset",
                "source": "json",
                "data_files": str(staging / "train.json"),
                "split": "train",
                "column": "text",
                "packed": False,
            },
            "seed": 0,
            "shuffle": True,
            "batch_size": 2,
            "optimizer": {"_component_": "torch.optim.AdamW", "fused": False, "lr": TORCHTUNE_RECIPE["lr"]},
            "lr_scheduler": {
                "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                "num_warmup_steps": 1,
            },
            "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
            "epochs": 1,
            "max_steps_per_epoch": TORCHTUNE_RECIPE["steps"],
            "gradient_accumulation_steps": 1,
            "clip_grad_norm": None,
            "compile": False,
            "metric_logger": {
                "_component_": "torchtune.training.metric_logging.DiskLogger",
                "log_dir": str(staging / "out" / "logs"),
            },
            "log_every_n_steps": 1,
            "log_peak_memory_stats": False,
            "device": "cpu",
            "dtype": "fp32",
            "enable_activation_checkpointing": False,
            "enable_activation_offloading": False,
            "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
        }
        (staging / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
        environment = env.env()
        environment["PYTHONPATH"] = str(staging)
        _run(
            [str(env.python), "-m", "torchtune._cli.tune", "run", "lora_finetune_single_device", "--config",
             str(staging / "config.yaml")],
            staging,
            environment,
        )  # fmt: skip

    return _cached("torchtune", base, TORCHTUNE_RECIPE, build) / "out"


LLAMAFACTORY_RECIPE = {"template": "default", "rank": 8, "alpha": 16, "steps": 4, "lr": 2e-2}


def llamafactory_run(base: Path) -> Path:
    """The output_dir of a LLaMA-Factory LoRA SFT run on `base` (final adapter beside checkpoint-2/)."""

    def build(staging: Path) -> None:
        from demos.inputs import read_jsonl

        env = trainer_env("llamafactory")
        data = staging / "data"
        data.mkdir()
        rows = []
        for row in read_jsonl("demo_train.jsonl")[:16]:
            turns = [m for m in row["messages"] if m["role"] != "system"]
            rows.append({"instruction": turns[0]["content"], "input": "", "output": turns[1]["content"]})
        (data / "demo.json").write_text(json.dumps(rows))
        (data / "dataset_info.json").write_text(json.dumps({"demo": {"file_name": "demo.json"}}))
        config = {
            "model_name_or_path": str(base),
            "stage": "sft",
            "do_train": True,
            "finetuning_type": "lora",
            "lora_rank": LLAMAFACTORY_RECIPE["rank"],
            "lora_alpha": LLAMAFACTORY_RECIPE["alpha"],
            "lora_dropout": 0.0,
            "lora_target": "all",
            "dataset_dir": str(data),
            "dataset": "demo",
            "template": LLAMAFACTORY_RECIPE["template"],
            "cutoff_len": 64,
            "max_samples": 16,
            "overwrite_cache": True,
            "preprocessing_num_workers": 1,
            "dataloader_num_workers": 0,
            "output_dir": str(staging / "out"),
            "logging_steps": 1,
            "save_steps": 2,
            "overwrite_output_dir": True,
            "report_to": "none",
            "per_device_train_batch_size": 2,
            "learning_rate": LLAMAFACTORY_RECIPE["lr"],
            "max_steps": LLAMAFACTORY_RECIPE["steps"],
            "bf16": False,
            "fp16": False,
            "use_cpu": True,
            "seed": 0,
        }
        (staging / "config.yaml").write_text(json.dumps(config))
        _run(
            [str(env.python), "-m", "llamafactory.cli", "train", str(staging / "config.yaml")],
            staging,
            env.env(),
        )

    return _cached("llamafactory", base, LLAMAFACTORY_RECIPE, build) / "out"


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
