"""What a run reads and the typed records it keeps of it: the adapter and its config keys, the base's
config and tensors (safetensors headers and reads), tokenizer files, evaluation data, what a QLoRA
adapter was trained on, the options (with the Ollama release targeted) and profiles, a batch plan, and
the records and manifest that name every input and output by hash."""
