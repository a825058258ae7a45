"""ERC inside verl: the losses, the current policy's entropy, the route of both entropies to the loss, the
configuration and the trainer modes.

verl is imported here, before any module of this package runs: `import verl` loads `erc_verl.plugin`, which
imports modules of this package to register them. Importing verl first means the plugin always finds those
modules unstarted, whichever of them a process imports first (no half-initialised module in an import cycle).
"""

import verl  # noqa: F401
