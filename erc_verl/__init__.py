"""erc-verl: Entropy Ratio Clipping (arXiv 2512.05591) as a first-class part of verl 0.9.1.

verl loads `erc_verl.plugin` through its `verl.plugins` entry point at `import verl`. Importing verl here, before
any submodule of this package runs, lets that plugin import our modules whichever package a process imports
first (otherwise `import erc_verl.config` -> `import verl` -> plugin -> `erc_verl.config` is a cycle).
"""

from pathlib import Path

import verl  # noqa: F401

__version__ = "0.1.0"

# Recipes live at the repository root (`recipes/`); ERC_VERL_RECIPES points elsewhere (e.g. in an image).
REPO_ROOT = Path(__file__).resolve().parent.parent
