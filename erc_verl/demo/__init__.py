"""The CPU default's tiny run: a synthetic arithmetic task, a ~0.8M-parameter Qwen2 with a BPE tokenizer built
locally, and a seeded warm start; `build.setup` is the recipe's setup hook that makes (and caches) them."""
