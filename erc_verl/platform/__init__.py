"""verl on machines without an accelerator: the `cpu` platform, the `hf` rollout backend (an HF model in a Ray
actor, with the pure-torch `sampler`) and the `vllm_cpu` backend (vLLM's CPU build).

verl is imported first for the reason given in `erc_verl.core`: the plugin registers these modules.
"""

import verl  # noqa: F401
