"""Which code is running: ``seqrec.__version__`` plus the git commit it was built from.

A checkout answers with ``git rev-parse``. A cluster node runs from a synced copy without
``.git``, so the installer stamps the commit at install time (cluster.yaml's setup commands and
the k8s image write ``seqrec/_build_version.txt``); ``SEQREC_CODE_VERSION`` overrides both.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from seqrec import __version__

STAMP = Path(__file__).with_name("_build_version.txt")


def code_version() -> str:
    """``0.1.0+<short sha>`` (``+<sha>.dirty`` for uncommitted changes), or ``0.1.0`` when unknown."""
    stamped = os.environ.get("SEQREC_CODE_VERSION", "").strip()
    if not stamped and STAMP.is_file():
        stamped = STAMP.read_text().strip()
    if stamped:
        return stamped if stamped.startswith(__version__) else f"{__version__}+{stamped}"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def stamp() -> str:
    """Write the checkout's code version into the package (``seqrec/_build_version.txt``)."""
    version = code_version()
    if "+" not in version:
        raise SystemExit("seqrec.buildinfo: no git commit to stamp here (not a checkout, or git missing)")
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    version += ".dirty" if dirty and not version.endswith(".dirty") else ""
    STAMP.write_text(version + "\n")
    return version


if __name__ == "__main__":
    # python -m seqrec.buildinfo [--stamp]: print the code version (--stamp: write it first; run this
    # before `ray up cluster.yaml`, whose synced copy of the checkout has no .git).
    import sys

    if "--stamp" in sys.argv[1:]:
        if STAMP.is_file():
            STAMP.unlink()  # a stale stamp must not win over git
        print(stamp())
    else:
        print(code_version())
