import sys

from erc_verl.data.prepare import main

sys.exit(main())
