"""Entry point for `ray job submit ... -- python jobs/evaluate.py --help`; see seqrec/cli.py."""

import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repository, for ray job submit --working-dir

from seqrec.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
