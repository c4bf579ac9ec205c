"""The check against the unmerged model: the PyTorch reference, scoring and gates, tokenizer parity,
the importance matrix, and the reports."""
