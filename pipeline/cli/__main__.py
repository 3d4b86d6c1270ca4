"""`python -m pipeline.cli` is the same as the `satseg` console script."""

import sys

from pipeline.cli import main

sys.exit(main())
