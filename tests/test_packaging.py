"""What `pip install .` ships: every subpackage, and the recipes inside the wheel, found from any directory."""

import os
import subprocess
import sys
import tomllib
import zipfile

from tests import REPO_ROOT


def _listed_packages() -> set[str]:
    return set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_pyproject_lists_every_subpackage_and_recipe_folder():
    code = {
        ".".join(path.relative_to(REPO_ROOT).parent.parts)
        for path in (REPO_ROOT / "erc_verl").rglob("__init__.py")
    }
    recipes = {"erc_verl.recipes"} | {
        "erc_verl.recipes." + ".".join(d.relative_to(REPO_ROOT / "recipes").parts)
        for d in (REPO_ROOT / "recipes").rglob("*")
        if d.is_dir() and any(d.glob("*.yaml"))
    }
    assert _listed_packages() == code | recipes


def test_an_installed_wheel_finds_its_recipes(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "wheel")],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "wheel").glob("erc_verl-*.whl")
    recipe_files = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "recipes").rglob("*.yaml")}
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
        shipped = {name.removeprefix("erc_verl/") for name in archive.namelist() if name.endswith(".yaml")}
    assert shipped == recipe_files

    # the installed copy, imported from elsewhere, with no checkout beside it and no ERC_VERL_RECIPES
    env = {k: v for k, v in os.environ.items() if k != "ERC_VERL_RECIPES"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    code = "from erc_verl.runs import recipes; print(recipes.recipes_dir()); print(*recipes.available())"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    where, names = result.stdout.strip().splitlines()
    assert where == str(tmp_path / "site" / "erc_verl" / "recipes")
    assert set(names.split()) == {p.stem for p in (REPO_ROOT / "recipes").glob("*.yaml")}
