"""`python -m ossgpt ...` (what `torchrun -m ossgpt train ...` runs)."""

import sys

from ossgpt.cli import main

sys.exit(main())
