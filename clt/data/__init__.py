"""Token shards, tokenizers, demo data and the step-indexed input pipeline."""
