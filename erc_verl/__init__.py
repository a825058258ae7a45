"""erc-verl: Entropy Ratio Clipping (arXiv 2512.05591) as a first-class part of verl 0.9.1.

Importing the package does nothing heavy; verl loads `erc_verl.plugin` through its `verl.plugins` entry point.
"""

from pathlib import Path

__version__ = "0.1.0"

# Recipes live at the repository root (`recipes/`); ERC_VERL_RECIPES points elsewhere (e.g. in an image).
REPO_ROOT = Path(__file__).resolve().parent.parent
