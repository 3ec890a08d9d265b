"""``python -m autocomp``."""

import sys

from autocomp.cli import main

sys.exit(main())
