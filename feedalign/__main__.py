"""`python -m feedalign ...` (also what `torchrun -m feedalign` runs)."""

import sys

from feedalign.cli import main

sys.exit(main())
