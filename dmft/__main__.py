"""``python -m dmft``: the command line (see :mod:`dmft.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
