"""``python -m ttakit.cli``: the command line (as benchmarks and tests start it)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
