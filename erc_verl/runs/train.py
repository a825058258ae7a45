"""How a run starts: `erc-verl train [RECIPE] [hydra overrides...]`, verl's `main_ppo` on a recipe.

Same as `python -m erc_verl train ...`. Recipes are Hydra configs composed on verl's `ppo_trainer` tree
(`erc_verl.runs.recipes`), so every override `verl.trainer.main_ppo` accepts works here too, as do Hydra's own
flags (`-m` multirun, `--cfg job`, ...). Before any Ray worker starts, an ERC loss mode switches on what it needs
(`erc_verl.core.config.enable_erc`) and the configuration is checked (`erc_verl.runs.preflight`).

A recipe may name hooks under `erc_verl:`: `setup` ("module:function", called with the config before the run,
e.g. to build a local model and data) and `report` (called after it, e.g. to plot the metrics); and
`erc_verl.metrics_file`, the run's metrics JSONL, kept whole across kills and resumes (`erc_verl.runs.metrics`).
"""

import contextlib
import importlib
import json
import os
import sys

from erc_verl.runs import recipes

DEFAULT_CPU_RECIPE = "cpu_tiny_erc_dapo"


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def split_recipe(argv: list[str]) -> tuple[str | None, list[str]]:
    """(recipe, remaining args) from `RECIPE overrides...` or `--config-name[=]RECIPE overrides...`."""
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--config-name" and i + 1 < len(args):
            return args[i + 1], args[:i] + args[i + 2 :]
        if arg.startswith("--config-name="):
            return arg.split("=", 1)[1], args[:i] + args[i + 1 :]
    if args and not args[0].startswith("-") and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def default_recipe() -> str:
    """The tiny CPU run on a machine without a GPU; elsewhere a recipe must be named."""
    if _has_accelerator():
        raise SystemExit(f"erc-verl train: name a recipe; available: {', '.join(recipes.available())}")
    return DEFAULT_CPU_RECIPE


def call_hook(cfg, name: str):
    """Call the recipe's `erc_verl.<name>` hook ("module:function") with the config, if it names one."""
    from omegaconf import OmegaConf

    spec = OmegaConf.select(cfg, f"erc_verl.{name}")
    if not spec:
        return None
    module, _, function = spec.partition(":")
    if not function:
        raise ValueError(f"erc_verl.{name}={spec!r}: expected 'module:function'")
    return getattr(importlib.import_module(module), function)(cfg)


# ray.init arguments that only apply when it starts a cluster (it rejects most of them when joining one)
CLUSTER_START_ONLY = ("num_cpus", "num_gpus", "resources", "labels", "object_store_memory", "_system_config",
                      "_temp_dir", "include_dashboard", "dashboard_host", "dashboard_port")


def join_job_cluster(cfg) -> None:
    """Inside a Ray job (`erc-verl submit`), train on the job's cluster.

    `ray_kwargs.ray_init.address: local` (the CPU recipe: a cluster owned by the run) applies only to runs started
    outside one; inside a job it would start a second cluster, whose workers cannot fetch the job's working_dir.
    """
    from omegaconf import OmegaConf, open_dict
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job_config = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    ray_init = cfg.ray_kwargs.ray_init
    if job_config is None or ray_init.get("address") not in (None, "local", "auto"):
        return
    job_env = json.loads(job_config).get("runtime_env", {}).get("env_vars", {})
    # Ray refuses a variable set both by the job and by ray.init: the job's (`submit --env`) wins
    env_vars = {k: v for k, v in (OmegaConf.select(ray_init, "runtime_env.env_vars") or {}).items() if k not in job_env}
    for name in ("VERL_FILE_LOGGER_PATH", "TENSORBOARD_DIR"):  # set by run(); the job's workers do not inherit
        if name in os.environ:  # the driver's env
            env_vars[name] = os.environ[name]
    with open_dict(cfg):
        ray_init.address = None  # ray.init joins RAY_ADDRESS, which the job supervisor sets
        for key in CLUSTER_START_ONLY:
            ray_init.pop(key, None)
        OmegaConf.update(ray_init, "runtime_env.env_vars", env_vars, merge=False, force_add=True)
    print(f"erc-verl train: in a Ray job: joining its cluster at {os.environ.get('RAY_ADDRESS')}", flush=True)


def run(cfg) -> None:
    """Check, set up and run one configuration (what `main_ppo.main` does, plus erc-verl's start-up work)."""
    from omegaconf import OmegaConf
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    from erc_verl.core.config import ErcConfigError, enable_erc
    from erc_verl.runs import console, metrics, preflight

    try:
        enable_erc(cfg)
        preflight.check_rollout_backend(cfg)
        preflight.check_registry_names(cfg)
        preflight.check_reference_on_cpu(cfg)
        preflight.check_token_budgets(cfg)
        preflight.check_shared_paths(cfg)  # before the setup hook, which makes the CPU recipe's paths absolute
        call_hook(cfg, "setup")
        preflight.check_data_files(cfg)
        preflight.check_models(cfg)
        preflight.check_attention(cfg)  # after the setup hook: it reads the model's head counts
    except (ErcConfigError, preflight.PreflightError) as err:
        raise SystemExit(f"erc-verl train: {err}") from None
    auto_set_device(cfg)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    metrics_file = OmegaConf.select(cfg, "erc_verl.metrics_file")
    progress = contextlib.nullcontext()
    if metrics_file:
        # verl's file logger writes this attempt's rows; erc_verl.runs.metrics keeps the run's file whole
        os.environ["VERL_FILE_LOGGER_PATH"] = metrics.start(cfg, metrics_file)
        # verl's tensorboard logger (trainer.logger=[...,tensorboard]) writes next to the metrics file
        run_dir = os.path.dirname(os.path.abspath(metrics_file))
        os.environ.setdefault("TENSORBOARD_DIR", os.path.join(run_dir, "tensorboard"))
        progress = console.follow(cfg, os.environ["VERL_FILE_LOGGER_PATH"])
    join_job_cluster(cfg)
    try:
        with progress:
            if cfg.trainer.use_v1:
                run_ppo(cfg, task_runner_class=TaskRunnerV1)
            else:
                from verl.trainer.main_ppo_v0 import TaskRunner

                run_ppo(cfg, task_runner_class=TaskRunner)
    finally:
        if metrics_file:
            metrics.fold(metrics_file)
    call_hook(cfg, "report")


def main(argv: list[str] | None = None) -> int:
    import hydra

    argv = sys.argv[1:] if argv is None else argv
    recipe, hydra_args = split_recipe(argv)
    try:
        recipe = recipes.resolve(recipe) if recipe is not None else default_recipe()
    except recipes.RecipeError as err:
        raise SystemExit(f"erc-verl train: {err}") from None
    # Hydra reads its command line from sys.argv: hand it the overrides and flags, not the recipe name
    sys.argv = [sys.argv[0], *hydra_args]
    hydra.main(config_path=str(recipes.recipes_dir()), config_name=recipe, version_base=None)(run)()
    return 0
