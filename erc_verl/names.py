"""Names and errors shared by the ERC modules.

Free of verl imports on purpose: verl loads our plugin from inside `import verl`, possibly while one of our own
modules is half-way through importing verl; what the plugin's modules need at import time must come from here.
"""

POLICY_LOSS_KEY = "actor_rollout_ref.actor.policy_loss"
ERC_CONFIG_TARGET = "erc_verl.config.ErcPolicyLossConfig"
ERC_PREFIX = "erc_"


class ErcConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what is allowed."""


class MissingEntropyError(RuntimeError):
    """An ERC loss was called without the entropies it needs."""


def is_erc_mode(loss_mode: str) -> bool:
    return loss_mode.startswith(ERC_PREFIX)


def erc_base_mode(loss_mode: str) -> str:
    """`erc_dapo` -> `vanilla` (DAPO's token loss is verl's vanilla PPO loss), `erc_<name>` -> `<name>`."""
    base = loss_mode[len(ERC_PREFIX) :]
    return "vanilla" if base == "dapo" else base
