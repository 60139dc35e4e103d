"""Data: the synthetic world, external sources, the normalised schema and the tokenizer."""
