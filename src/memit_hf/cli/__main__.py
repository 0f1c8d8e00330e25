"""`python -m memit_hf.cli`, as launchers such as `accelerate launch -m memit_hf.cli stats ...` run it."""

import sys

from .command import main


sys.exit(main())
