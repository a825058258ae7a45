"""CPU-only pipeline: a verl platform, an HF-`generate` rollout backend, and the tiny model, task and warm start
that let the real trainer (Ray, FSDP2 actor, rollout workers, reward workers) run on a machine without a GPU."""
