"""`python -m captioning.report <multirun dir>`: see `main`."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
