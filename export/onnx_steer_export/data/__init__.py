"""Prompt data and how it becomes token ids: the committed splits, contrastive pairs, the bundle tokenizer."""
