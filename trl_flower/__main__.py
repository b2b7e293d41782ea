"""`python -m trl_flower` runs the command line."""

import sys

from trl_flower.cli import main

sys.exit(main())
