"""erc-verl's configuration: the `policy_loss` dataclass that carries the ERC band and the positive-sample NLL term,
what each option switches on, and the start-up checks of ERC, GPPO, NLL and official dynamic-sampling settings.

Every check runs in the driver before any Ray worker starts and fails with the full key and what is allowed
(the dataclass checks run again wherever verl instantiates the actor config). Checks that are not about these
options (data files, registry names, rollout backends) live in `erc_verl.runs.preflight`.
"""

import math
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf, open_dict
from verl.workers.config import PolicyLossConfig

POLICY_LOSS_KEY = "actor_rollout_ref.actor.policy_loss"
FILTER_GROUPS_KEY = "algorithm.filter_groups"
ERC_CONFIG_TARGET = "erc_verl.core.config.ErcPolicyLossConfig"
STOCK_CONFIG_TARGETS = (None, "verl.workers.config.PolicyLossConfig")
ERC_PREFIX = "erc_"
# verl's V1 trainer modes that have an erc-verl variant `erc_<mode>` (erc_verl.core.trainer_modes)
ERC_BASE_TRAINER_MODES = ("sync", "colocate_async", "separate_async")
ERC_TRAINER_MODES = tuple(ERC_PREFIX + mode for mode in ERC_BASE_TRAINER_MODES)
# policy_loss keys only ErcPolicyLossConfig carries
ERC_POLICY_LOSS_KEYS = ("erc_beta_low", "erc_beta_high", "positive_nll_coeff", "positive_nll_reward")
# loss modes whose start-up checks cover the PPO clip settings (gppo reads clip_ratio_low/high/c like vanilla)
CLIPPED_MODES = ("gppo",)
# actor strategies whose engines have the swappable `compute_entropy_from_logits` (erc_verl.core.entropy)
NO_GRAD_ENTROPY_STRATEGIES = ("fsdp", "fsdp2", "automodel", "veomni", "torchtitan")
PAPER = "arXiv 2512.05591"
OFFICIAL_CODE = "the official ERC code (github.com/Kwai-Klear/ERC)"


class ErcConfigError(ValueError):
    """A setting that cannot run; the message names the key and what is allowed."""


# erc-verl's custom sampler that only shortens the poll interval of the buffer the trainer builds itself
# (erc_verl/platform/replay.py): with the official dynamic sampling, that buffer is the official sampler
POLL_INTERVAL_SAMPLER = "pkg://erc_verl.platform.replay"

def is_erc_mode(loss_mode: str) -> bool:
    return loss_mode.startswith(ERC_PREFIX)


def erc_base_mode(loss_mode: str) -> str:
    """`erc_dapo` -> `vanilla` (DAPO's token loss is verl's vanilla PPO loss), `erc_<name>` -> `<name>`."""
    base = loss_mode[len(ERC_PREFIX) :]
    return "vanilla" if base == "dapo" else base


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_erc_band(beta_low, beta_high) -> None:
    """The band (1 - beta_low, 1 + beta_high) must be a non-empty interval of positive ratios."""
    if not _is_number(beta_low) or not 0.0 < beta_low < 1.0:
        raise ErcConfigError(f"{POLICY_LOSS_KEY}.erc_beta_low={beta_low!r}: must be a number in (0, 1)")
    if not _is_number(beta_high) or not beta_high > 0.0:
        raise ErcConfigError(f"{POLICY_LOSS_KEY}.erc_beta_high={beta_high!r}: must be a number > 0")


def check_positive_nll(coeff, reward) -> None:
    if not _is_number(coeff) or coeff < 0.0:
        raise ErcConfigError(f"{POLICY_LOSS_KEY}.positive_nll_coeff={coeff!r}: must be a finite number >= 0")
    if not _is_number(reward):
        raise ErcConfigError(f"{POLICY_LOSS_KEY}.positive_nll_reward={reward!r}: must be a finite number")


@dataclass
class ErcPolicyLossConfig(PolicyLossConfig):
    """verl's `PolicyLossConfig` plus erc-verl's loss options: the ERC band and the positive-sample NLL term.

    Select it with `actor_rollout_ref.actor.policy_loss._target_=erc_verl.core.config.ErcPolicyLossConfig`
    (`erc-verl train` does so by itself for `erc_*` loss modes and whenever one of these keys is set).
    """

    # --- Entropy Ratio Clipping (erc_* loss modes; ignored by the others) ---
    erc_beta_low: float = field(
        default=0.05,
        metadata={"help": f"ERC keeps a token's gradient while H/H_old > 1 - erc_beta_low; in (0, 1). {PAPER}: 0.05"},
    )
    erc_beta_high: float = field(
        default=0.05,
        metadata={"help": f"ERC keeps a token's gradient while H/H_old < 1 + erc_beta_high; > 0. {PAPER}: 0.05"},
    )

    # --- Positive-sample NLL term (any loss mode) ---
    positive_nll_coeff: float = field(
        default=0.0,
        metadata={
            "help": "Adds positive_nll_coeff x NLL to the policy loss, NLL being the mean of -log pi(token) over the "
            "response tokens of the positive responses (summed token-level reward == positive_nll_reward), "
            "aggregated with loss_agg_mode over the whole mini-batch, outside the ERC mask, logged as "
            f"actor/positive_nll. {OFFICIAL_CODE}: actor.postive_loss_coeff=0.1 in every script; 0 turns it off."
        },
    )
    positive_nll_reward: float = field(
        default=1.0,
        metadata={
            "help": "A response is positive when its summed token-level reward (rm_scores) equals this: the "
            f"reward's correct_score. {OFFICIAL_CODE}: 1.0"
        },
    )

    def __post_init__(self):
        check_erc_band(self.erc_beta_low, self.erc_beta_high)
        check_positive_nll(self.positive_nll_coeff, self.positive_nll_reward)


def _select(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default)


def _is_erc_config_target(target) -> bool:
    from hydra.utils import get_class

    try:
        return isinstance(target, str) and issubclass(get_class(target), ErcPolicyLossConfig)
    except (ImportError, ValueError):
        return False


def positive_nll_coeff(cfg: DictConfig) -> float:
    return _select(cfg, f"{POLICY_LOSS_KEY}.positive_nll_coeff", 0.0) or 0.0


def uses_official_sampling(cfg: DictConfig) -> bool:
    """DAPO dynamic sampling the official way: `max_num_gen_batches` > 0 bounds the generation batches per step
    (verl's own V1 sampler ignores that key and refills instead)."""
    return bool(_select(cfg, f"{FILTER_GROUPS_KEY}.enable", False)) and (
        _select(cfg, f"{FILTER_GROUPS_KEY}.max_num_gen_batches", 0) or 0
    ) > 0


def erc_verl_options(cfg: DictConfig) -> list[str]:
    """The settings that need erc-verl's trainer modes, as `key=value` (empty: verl's stock modes will do)."""
    loss_mode = _select(cfg, f"{POLICY_LOSS_KEY}.loss_mode", "vanilla")
    options = []
    if is_erc_mode(loss_mode):
        options.append(f"loss_mode={loss_mode}")
    if positive_nll_coeff(cfg):
        options.append(f"positive_nll_coeff={positive_nll_coeff(cfg)}")
    if uses_official_sampling(cfg):
        options.append(f"max_num_gen_batches={_select(cfg, f'{FILTER_GROUPS_KEY}.max_num_gen_batches')}")
    return options


def check_erc_config(cfg: DictConfig) -> None:
    """Start-up checks of erc-verl's options in a verl config; a no-op for a config that uses none of them."""
    loss_mode = _select(cfg, f"{POLICY_LOSS_KEY}.loss_mode", "vanilla")
    target = _select(cfg, f"{POLICY_LOSS_KEY}._target_")
    erc_keys = [key for key in ERC_POLICY_LOSS_KEYS if _select(cfg, f"{POLICY_LOSS_KEY}.{key}") is not None]
    uses_erc_keys = bool(erc_keys)
    if (is_erc_mode(loss_mode) or uses_erc_keys) and not _is_erc_config_target(target):
        needs = f"loss_mode={loss_mode} needs" if is_erc_mode(loss_mode) else f"{', '.join(erc_keys)} need"
        raise ErcConfigError(
            f"{POLICY_LOSS_KEY}._target_={target!r}: {needs} {ERC_CONFIG_TARGET} (it carries "
            f"{', '.join(ERC_POLICY_LOSS_KEYS)})"
        )
    if is_erc_mode(loss_mode):
        check_erc_band(
            _select(cfg, f"{POLICY_LOSS_KEY}.erc_beta_low"), _select(cfg, f"{POLICY_LOSS_KEY}.erc_beta_high")
        )
    if uses_erc_keys:
        check_positive_nll(
            _select(cfg, f"{POLICY_LOSS_KEY}.positive_nll_coeff", 0.0),
            _select(cfg, f"{POLICY_LOSS_KEY}.positive_nll_reward", 1.0),
        )
    if uses_official_sampling(cfg):
        check_official_sampling(cfg)
    options = erc_verl_options(cfg)
    if options:
        check_erc_trainer_path(cfg, ", ".join(options))
    if is_erc_mode(loss_mode) or loss_mode in CLIPPED_MODES:
        check_clip_settings(cfg)


def check_clip_settings(cfg: DictConfig) -> None:
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


def check_official_sampling(cfg: DictConfig) -> None:
    """One generation batch of data.gen_batch_size prompts (or up to max_num_gen_batches of them) per step."""
    why = f"{FILTER_GROUPS_KEY}.max_num_gen_batches={_select(cfg, f'{FILTER_GROUPS_KEY}.max_num_gen_batches')}"
    gen_batch_size = _select(cfg, "data.gen_batch_size")
    if isinstance(gen_batch_size, bool) or not isinstance(gen_batch_size, int) or gen_batch_size < 1:
        raise ErcConfigError(
            f"data.gen_batch_size={gen_batch_size!r}: {why} generates batches of data.gen_batch_size prompts; "
            "set it to a positive integer (the paper: 256)"
        )
    if not _select(cfg, f"{FILTER_GROUPS_KEY}.metric"):
        raise ErcConfigError(f"{FILTER_GROUPS_KEY}.metric must be set when group filtering is enabled")
    mode = _select(cfg, "trainer.v1.trainer_mode", "sync")
    if mode not in ("sync", ERC_PREFIX + "sync"):
        raise ErcConfigError(
            f"trainer.v1.trainer_mode={mode!r}: {why} (official dynamic sampling) is a sync mode; use "
            f"trainer.v1.trainer_mode=erc_sync, or {FILTER_GROUPS_KEY}.max_num_gen_batches=0 (verl's own sampling)"
        )
    if _select(cfg, "trainer.v1.sync.parameter_sync_step", 1) != 1:
        raise ErcConfigError(
            f"trainer.v1.sync.parameter_sync_step={_select(cfg, 'trainer.v1.sync.parameter_sync_step')!r}: "
            f"{why} trains once per generation batch; set it to 1"
        )
    if _select(cfg, "trainer.v1.sampler.custom_sampler.path") not in (None, "", POLL_INTERVAL_SAMPLER):
        raise ErcConfigError(
            f"trainer.v1.sampler.custom_sampler.path={_select(cfg, 'trainer.v1.sampler.custom_sampler.path')!r}: "
            f"{why} brings its own sampler; unset one of them"
        )
    if _select(cfg, "reward.reward_model.enable", False) and not _select(
        cfg, "reward.reward_model.enable_resource_pool", False
    ):
        raise ErcConfigError(
            f"reward.reward_model.enable=True without enable_resource_pool: {why} filters groups on the reward "
            "at sampling time, which a colocated reward model computes only later"
        )


def check_erc_trainer_path(cfg: DictConfig, why: str) -> None:
    """erc-verl's options run in its V1 trainer modes: they hand the entropies, the positive-token counts and the
    official sampler to verl; ERC also needs the old policy's entropy next to old_log_probs."""
    if not _select(cfg, "trainer.use_v1", True):
        raise ErcConfigError(
            f"trainer.use_v1=False: {why} needs the V1 trainer (the legacy trainer drops the old policy's entropy "
            "and the rewards before the actor update); set trainer.use_v1=True"
        )
    mode = _select(cfg, "trainer.v1.trainer_mode", "sync")
    if mode not in ERC_TRAINER_MODES:
        raise ErcConfigError(
            f"trainer.v1.trainer_mode={mode!r}: {why} needs one of {sorted(ERC_TRAINER_MODES)} "
            "(erc-verl's variants of verl's modes); `erc-verl train` picks it for you"
        )
    loss_mode = _select(cfg, f"{POLICY_LOSS_KEY}.loss_mode", "vanilla")
    if is_erc_mode(loss_mode) and _select(cfg, "algorithm.rollout_correction.bypass_mode", False):
        raise ErcConfigError(
            f"algorithm.rollout_correction.bypass_mode=True: loss_mode={loss_mode} needs the old policy's entropy, "
            "which bypass mode never computes; set it to False"
        )
    if _select(cfg, "distillation.enabled", False):
        raise ErcConfigError(f"distillation.enabled=True: not supported together with {why}")


def erc_trainer_mode(mode: str) -> str:
    """The erc-verl variant of a verl trainer mode (idempotent)."""
    if mode in ERC_TRAINER_MODES:
        return mode
    if mode not in ERC_BASE_TRAINER_MODES:
        raise ErcConfigError(f"trainer.v1.trainer_mode={mode!r}: erc-verl supports {list(ERC_BASE_TRAINER_MODES)}")
    return ERC_PREFIX + mode


def enable_erc(cfg: DictConfig) -> DictConfig:
    """Turn on what erc-verl's options need, so that setting an option is the only flag a user sets.

    - the policy-loss dataclass that carries the ERC band and the NLL term, for `erc_*` loss modes and whenever
      one of its keys is set;
    - erc-verl's variant of the trainer mode whenever an option needs it (`erc_verl_options`): an `erc_*` loss
      (it delivers both entropies), `positive_nll_coeff` > 0 (it counts the positive tokens of each mini-batch),
      official dynamic sampling (`algorithm.filter_groups.max_num_gen_batches` > 0);
    - for `erc_*` losses, current-policy entropy in the actor update, without an autograd graph when nothing
      backpropagates into it (entropy_coeff == 0: ERC only needs it as a mask). The erc-verl trainer modes' actor
      engines then compute it under no_grad in chunks (`erc_verl.core.entropy`); verl's entropy checkpointing
      covers the no-remove-padding path and engines without that function, where verl's own entropy function
      runs: it keeps only the logits (already kept for the log-probs) and recomputes nothing.
    Then run the start-up checks. Mutates and returns `cfg`.
    """
    loss_mode = _select(cfg, f"{POLICY_LOSS_KEY}.loss_mode", "vanilla")
    with open_dict(cfg):
        policy_loss = OmegaConf.select(cfg, POLICY_LOSS_KEY)
        uses_erc_keys = any(policy_loss.get(key) is not None for key in ERC_POLICY_LOSS_KEYS)
        if (is_erc_mode(loss_mode) or uses_erc_keys) and policy_loss.get("_target_") in STOCK_CONFIG_TARGETS:
            policy_loss["_target_"] = ERC_CONFIG_TARGET
        if is_erc_mode(loss_mode):
            policy_loss.setdefault("erc_beta_low", 0.05)
            policy_loss.setdefault("erc_beta_high", 0.05)
        if erc_verl_options(cfg) and _select(cfg, "trainer.use_v1", True):
            cfg.trainer.v1.trainer_mode = erc_trainer_mode(_select(cfg, "trainer.v1.trainer_mode", "sync"))
        if is_erc_mode(loss_mode) and _select(cfg, "trainer.use_v1", True):
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
