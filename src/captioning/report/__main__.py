"""`python -m captioning.report <multirun dir> [--out DIR] [--docs FILE --name NAME]` (`main`)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
