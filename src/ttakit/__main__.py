"""``python -m ttakit`` runs the command line, as ``torchrun -m ttakit`` does on each process."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
