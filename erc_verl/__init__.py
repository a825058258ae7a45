"""erc-verl: Entropy Ratio Clipping (arXiv 2512.05591) as a first-class part of verl 0.9.1.

Layers (each a subpackage):
- `core`: ERC itself, inside verl: losses, the entropy, how both entropies reach the loss, config, trainer modes
- `runs`: how runs start and are looked at: recipes, start-up checks, train, eval, submit, metrics, reports
- `platform`: verl on machines without an accelerator: the CPU platform and the `hf` / `vllm_cpu` rollouts
- `reward`: the verifiable-math reward (math-verify with hard deadlines)
- `data`: the paper's data as verl parquet
- `demo`: the tiny CPU run's model, task and warm start
Importing this package imports nothing else (the command line starts in milliseconds); `core` and `platform`
import verl, which loads `erc_verl.plugin`.
"""

__version__ = "0.1.0"
