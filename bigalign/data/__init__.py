"""Data: built-in synthetic sources, the sentencepiece tokenizer, and grain input pipelines."""
