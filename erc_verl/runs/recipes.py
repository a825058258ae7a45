"""Where the recipes are, which exist, and how a name becomes a composed config.

Recipes are Hydra configs composed on verl's `ppo_trainer` tree. They are looked up in `$ERC_VERL_RECIPES`, else
in the `recipes/` folder of the checkout this package runs from, else in the copy a wheel installs inside the
package (`erc_verl/recipes/`, from the same folder at build time).
"""

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CHECKOUT_DIR = PACKAGE_DIR.parent  # the repository root, when running from a checkout (or an editable install)
RECIPES_ENV = "ERC_VERL_RECIPES"


class RecipeError(ValueError):
    """An unknown recipe; the message lists the available ones."""


def recipes_dir() -> Path:
    if os.environ.get(RECIPES_ENV):
        return Path(os.environ[RECIPES_ENV]).expanduser().resolve()
    for candidate in (CHECKOUT_DIR / "recipes", PACKAGE_DIR / "recipes"):
        if candidate.is_dir():
            return candidate
    raise RecipeError(f"no recipes folder: set {RECIPES_ENV} to one (e.g. the recipes/ of an erc-verl checkout)")


def available(directory: Path | None = None) -> dict[str, str]:
    """Recipe name -> its one-line description (the first `# ` comment line of the file)."""
    recipes = {}
    for path in sorted((directory or recipes_dir()).glob("*.yaml")):
        first_comment = next((line[2:].strip() for line in path.read_text().splitlines() if line.startswith("# ")), "")
        recipes[path.stem] = first_comment
    return recipes


def resolve(recipe: str, directory: Path | None = None) -> str:
    """The recipe name for `name`, `name.yaml` or `recipes/name.yaml`; RecipeError naming the available ones."""
    directory = directory or recipes_dir()
    name = Path(recipe).name.removesuffix(".yaml")
    recipes = available(directory)
    if name in recipes and Path(recipe).parent in (Path("."), Path("recipes"), directory):
        return name
    listing = "\n  ".join(recipes) if recipes else "(none)"
    raise RecipeError(f"no recipe {recipe!r} in {directory}; available recipes:\n  {listing}")


def compose(recipe: str, overrides: list[str] | None = None):
    """The recipe's config with overrides, as `erc-verl train` runs it (ERC switched on and checked)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from erc_verl.core.config import enable_erc

    with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
        cfg = hydra_compose(config_name=resolve(recipe), overrides=list(overrides or []))
    return enable_erc(cfg)


def list_main(argv: list[str]) -> int:
    """`erc-verl recipes`: one line per recipe."""
    for name, description in available().items():
        print(f"{name:<32} {description}")
    return 0
