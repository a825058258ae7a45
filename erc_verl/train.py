"""How a run starts: `erc-verl train [RECIPE] [hydra overrides...]`, verl's `main_ppo` on a recipe.

Same as `python -m erc_verl.train --config-name RECIPE [overrides...]`. Recipes are Hydra configs in `recipes/`
composed on verl's `ppo_trainer` tree, so every override `verl.trainer.main_ppo` accepts works here too, as do
Hydra's own flags (`-m` multirun, `--cfg job`, ...). Before any Ray worker starts, an ERC loss mode switches on
what it needs (`erc_verl.config.enable_erc`) and the configuration is checked.

A recipe may name hooks under `erc_verl:`: `setup` ("module:function", called with the config before the run,
e.g. to build a local model and data) and `report` (called after it, e.g. to plot the metrics); and
`erc_verl.metrics_file`, the run's metrics JSONL, kept whole across kills and resumes (`metrics_log`).
"""

import importlib
import os
import sys
from pathlib import Path

from erc_verl import REPO_ROOT

DEFAULT_CPU_RECIPE = "cpu_tiny_erc_dapo"


def recipes_dir() -> Path:
    return Path(os.environ.get("ERC_VERL_RECIPES", REPO_ROOT / "recipes")).resolve()


def available_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description (the first `# ` comment line of the file)."""
    recipes = {}
    for path in sorted(recipes_dir().glob("*.yaml")):
        first_comment = next((line[2:].strip() for line in path.read_text().splitlines() if line.startswith("# ")), "")
        recipes[path.stem] = first_comment
    return recipes


def list_recipes_main(argv: list[str]) -> int:
    for name, description in available_recipes().items():
        print(f"{name:<32} {description}")
    return 0


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


def resolve_recipe(recipe: str | None) -> str:
    recipes = available_recipes()
    if recipe is None:
        if _has_accelerator():
            raise SystemExit(f"erc-verl train: name a recipe; available: {', '.join(recipes)}")
        recipe = DEFAULT_CPU_RECIPE
    if recipe.endswith(".yaml"):
        recipe = Path(recipe).stem
    if recipe not in recipes:
        raise SystemExit(
            f"erc-verl train: no recipe {recipe!r} in {recipes_dir()}; available: {', '.join(recipes) or 'none'}"
        )
    return recipe


def compose(recipe: str, overrides: list[str] | None = None):
    """The recipe's config with overrides, as `erc-verl train` would run it (ERC switched on and checked)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from erc_verl.config import enable_erc

    with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
        cfg = hydra_compose(config_name=resolve_recipe(recipe), overrides=list(overrides or []))
    return enable_erc(cfg)


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


def run(cfg) -> None:
    """Check, set up and run one configuration (what `main_ppo.main` does, plus ERC's start-up work)."""
    from omegaconf import OmegaConf
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    from erc_verl import metrics_log
    from erc_verl.config import ErcConfigError, check_data_files, check_rollout_backend, enable_erc

    try:
        enable_erc(cfg)
        check_rollout_backend(cfg)
        call_hook(cfg, "setup")
        check_data_files(cfg)
    except ErcConfigError as err:
        raise SystemExit(f"erc-verl train: {err}") from None
    auto_set_device(cfg)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    metrics_file = OmegaConf.select(cfg, "erc_verl.metrics_file")
    if metrics_file:
        # verl's file logger writes this attempt's rows; metrics_log keeps the run's file whole across resumes
        os.environ["VERL_FILE_LOGGER_PATH"] = metrics_log.start(cfg, metrics_file)
    try:
        if cfg.trainer.use_v1:
            run_ppo(cfg, task_runner_class=TaskRunnerV1)
        else:
            from verl.trainer.main_ppo_v0 import TaskRunner

            run_ppo(cfg, task_runner_class=TaskRunner)
    finally:
        if metrics_file:
            metrics_log.fold(metrics_file)
    call_hook(cfg, "report")


def main(argv: list[str] | None = None) -> int:
    import hydra

    argv = sys.argv[1:] if argv is None else argv
    recipe, hydra_args = split_recipe(argv)
    recipe = resolve_recipe(recipe)
    # Hydra reads its command line from sys.argv: hand it the overrides and flags, not the recipe name
    sys.argv = [sys.argv[0], *hydra_args]
    hydra.main(config_path=str(recipes_dir()), config_name=recipe, version_base=None)(run)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
