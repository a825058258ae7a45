"""`python -m erc_verl <command> ...`: the `erc-verl` command line without the console script."""

import sys

from erc_verl.cli import main

sys.exit(main())
