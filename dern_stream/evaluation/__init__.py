"""Out-of-core quality checks of a checkpoint: perplexity, agreement with a reference, per-layer error."""
