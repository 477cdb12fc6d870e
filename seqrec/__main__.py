"""``python -m seqrec ...``: the same command line as ``seqrec ...`` (see seqrec/cli.py)."""

import sys

from seqrec.cli import main

sys.exit(main())
