"""ERC's configuration: the `policy_loss` dataclass that carries the band, what an ERC loss mode switches on,
and the start-up checks of ERC and GPPO settings.

Every check runs in the driver before any Ray worker starts and fails with the full key and what is allowed
(the dataclass checks run again wherever verl instantiates the actor config). Checks that are not about ERC
(data files, registry names, rollout backends) live in `erc_verl.runs.preflight`.
"""

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf, open_dict
from verl.workers.config import PolicyLossConfig

POLICY_LOSS_KEY = "actor_rollout_ref.actor.policy_loss"
ERC_CONFIG_TARGET = "erc_verl.core.config.ErcPolicyLossConfig"
ERC_PREFIX = "erc_"
# verl's V1 trainer modes that have an ERC variant `erc_<mode>` (erc_verl.core.trainer_modes)
ERC_BASE_TRAINER_MODES = ("sync", "colocate_async", "separate_async")
ERC_TRAINER_MODES = tuple(ERC_PREFIX + mode for mode in ERC_BASE_TRAINER_MODES)
# loss modes whose start-up checks cover the PPO clip settings (gppo reads clip_ratio_low/high/c like vanilla)
CLIPPED_MODES = ("gppo",)
# actor strategies whose engines have the swappable `compute_entropy_from_logits` (erc_verl.core.entropy)
NO_GRAD_ENTROPY_STRATEGIES = ("fsdp", "fsdp2", "automodel", "veomni", "torchtitan")
PAPER = "arXiv 2512.05591"


class ErcConfigError(ValueError):
    """An ERC or GPPO setting that cannot run; the message names the key and what is allowed."""


def is_erc_mode(loss_mode: str) -> bool:
    return loss_mode.startswith(ERC_PREFIX)


def erc_base_mode(loss_mode: str) -> str:
    """`erc_dapo` -> `vanilla` (DAPO's token loss is verl's vanilla PPO loss), `erc_<name>` -> `<name>`."""
    base = loss_mode[len(ERC_PREFIX) :]
    return "vanilla" if base == "dapo" else base


def check_erc_band(beta_low, beta_high) -> None:
    """The band (1 - beta_low, 1 + beta_high) must be a non-empty interval of positive ratios."""
    if isinstance(beta_low, bool) or not isinstance(beta_low, (int, float)) or not 0.0 < beta_low < 1.0:
        raise ErcConfigError(f"{POLICY_LOSS_KEY}.erc_beta_low={beta_low!r}: must be a number in (0, 1)")
    if isinstance(beta_high, bool) or not isinstance(beta_high, (int, float)) or not beta_high > 0.0:
        raise ErcConfigError(f"{POLICY_LOSS_KEY}.erc_beta_high={beta_high!r}: must be a number > 0")


@dataclass
class ErcPolicyLossConfig(PolicyLossConfig):
    """verl's `PolicyLossConfig` plus the ERC band.

    Select it with `actor_rollout_ref.actor.policy_loss._target_=erc_verl.core.config.ErcPolicyLossConfig`
    (`erc-verl train` does so by itself for `erc_*` loss modes).
    """

    erc_beta_low: float = field(
        default=0.05,
        metadata={"help": f"ERC keeps a token's gradient while H/H_old > 1 - erc_beta_low; in (0, 1). {PAPER}: 0.05"},
    )
    erc_beta_high: float = field(
        default=0.05,
        metadata={"help": f"ERC keeps a token's gradient while H/H_old < 1 + erc_beta_high; > 0. {PAPER}: 0.05"},
    )

    def __post_init__(self):
        check_erc_band(self.erc_beta_low, self.erc_beta_high)


def _select(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default)


def _is_erc_config_target(target) -> bool:
    from hydra.utils import get_class

    try:
        return isinstance(target, str) and issubclass(get_class(target), ErcPolicyLossConfig)
    except (ImportError, ValueError):
        return False


def check_erc_config(cfg: DictConfig) -> None:
    """Start-up checks for a verl config that selects an ERC (or GPPO) loss; a no-op for other loss modes."""
    loss_mode = _select(cfg, f"{POLICY_LOSS_KEY}.loss_mode", "vanilla")
    if not (is_erc_mode(loss_mode) or loss_mode in CLIPPED_MODES):
        return
    target = _select(cfg, f"{POLICY_LOSS_KEY}._target_")
    if is_erc_mode(loss_mode):
        if not _is_erc_config_target(target):
            raise ErcConfigError(
                f"{POLICY_LOSS_KEY}._target_={target!r}: loss_mode={loss_mode} needs {ERC_CONFIG_TARGET} "
                "(it carries erc_beta_low / erc_beta_high)"
            )
        check_erc_band(_select(cfg, f"{POLICY_LOSS_KEY}.erc_beta_low"), _select(cfg, f"{POLICY_LOSS_KEY}.erc_beta_high"))
        check_entropies_can_arrive(cfg, loss_mode)
    for side in ("clip_ratio_low", "clip_ratio_high"):
        eps = _select(cfg, f"actor_rollout_ref.actor.{side}")
        if eps is None:
            eps = _select(cfg, "actor_rollout_ref.actor.clip_ratio")
        if not isinstance(eps, (int, float)) or not 0.0 < eps < (1.0 if side == "clip_ratio_low" else float("inf")):
            allowed = "(0, 1)" if side == "clip_ratio_low" else "> 0"
            raise ErcConfigError(f"actor_rollout_ref.actor.{side}={eps!r}: must be a number in {allowed}")
    clip_c = _select(cfg, "actor_rollout_ref.actor.clip_ratio_c", 3.0)
    if not isinstance(clip_c, (int, float)) or not clip_c > 1.0:
        raise ErcConfigError(f"actor_rollout_ref.actor.clip_ratio_c={clip_c!r}: must be a number > 1")


def check_entropies_can_arrive(cfg: DictConfig, loss_mode: str) -> None:
    """ERC needs the old policy's entropy next to old_log_probs, and the current one in the update."""
    if not _select(cfg, "trainer.use_v1", True):
        raise ErcConfigError(
            f"trainer.use_v1=False: loss_mode={loss_mode} needs the V1 trainer (the legacy trainer drops the old "
            "policy's entropy before the actor update); set trainer.use_v1=True"
        )
    mode = _select(cfg, "trainer.v1.trainer_mode", "sync")
    if mode not in ERC_TRAINER_MODES:
        raise ErcConfigError(
            f"trainer.v1.trainer_mode={mode!r}: loss_mode={loss_mode} needs one of {sorted(ERC_TRAINER_MODES)} "
            "(they hand both entropies to the loss); `erc-verl train` picks it for you"
        )
    if _select(cfg, "algorithm.rollout_correction.bypass_mode", False):
        raise ErcConfigError(
            f"algorithm.rollout_correction.bypass_mode=True: loss_mode={loss_mode} needs the old policy's entropy, "
            "which bypass mode never computes; set it to False"
        )
    if _select(cfg, "distillation.enabled", False):
        raise ErcConfigError(f"distillation.enabled=True: not supported together with loss_mode={loss_mode}")


def erc_trainer_mode(mode: str) -> str:
    """The ERC variant of a verl trainer mode (idempotent)."""
    if mode in ERC_TRAINER_MODES:
        return mode
    if mode not in ERC_BASE_TRAINER_MODES:
        raise ErcConfigError(f"trainer.v1.trainer_mode={mode!r}: ERC supports {list(ERC_BASE_TRAINER_MODES)}")
    return ERC_PREFIX + mode


def enable_erc(cfg: DictConfig) -> DictConfig:
    """Turn on what an ERC loss needs, so that selecting `loss_mode=erc_*` is the only flag a user sets.

    - the policy-loss dataclass that carries the ERC band;
    - the ERC variant of the trainer mode (it installs the entropy-aware loss on the actor workers);
    - current-policy entropy in the actor update, without an autograd graph when nothing backpropagates into it
      (entropy_coeff == 0: ERC only needs it as a mask). The ERC trainer modes' actor engines then compute it
      under no_grad in chunks (`erc_verl.core.entropy`); verl's entropy checkpointing covers the
      no-remove-padding path and engines without that function, where verl's own entropy function runs: it keeps
      only the logits (already kept for the log-probs) and recomputes nothing, since no gradient reaches it.
    Then run the start-up checks (for every loss mode). Mutates and returns `cfg`.
    """
    loss_mode = _select(cfg, f"{POLICY_LOSS_KEY}.loss_mode", "vanilla")
    if is_erc_mode(loss_mode):
        with open_dict(cfg):
            policy_loss = OmegaConf.select(cfg, POLICY_LOSS_KEY)
            if policy_loss.get("_target_") in (None, "verl.workers.config.PolicyLossConfig"):
                policy_loss["_target_"] = ERC_CONFIG_TARGET
            policy_loss.setdefault("erc_beta_low", 0.05)
            policy_loss.setdefault("erc_beta_high", 0.05)
            if _select(cfg, "trainer.use_v1", True):
                cfg.trainer.v1.trainer_mode = erc_trainer_mode(_select(cfg, "trainer.v1.trainer_mode", "sync"))
                actor = cfg.actor_rollout_ref.actor
                actor.calculate_entropy = True
                if actor.get("entropy_coeff", 0) == 0:
                    actor.entropy_from_logits_with_chunking = True
                    # Where the ERC workers' engine computes the entropy (remove-padding path) it is already
                    # graph-free, and verl's reentrant checkpoint of a graph-free function would fail if any
                    # gradient ever reached it; elsewhere verl calls its own function and checkpointing is needed.
                    actor.entropy_checkpointing = not (
                        _select(cfg, "actor_rollout_ref.model.use_remove_padding", True)
                        and actor.get("strategy") in NO_GRAD_ENTROPY_STRATEGIES
                    )
    check_erc_config(cfg)
    return cfg
