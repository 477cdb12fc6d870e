#!/usr/bin/env bash
# Quick start, command 2 (and CI): the lint and format gates, then the test suite. Tests start their
# own services (local Ray, a SeaweedFS S3 server on loopback) and clean them up.
source "$(dirname "$0")/env.sh"
if [ "$#" -eq 0 ]; then  # a run of chosen tests (arguments given) skips the gates
  ruff format --check --quiet . || { echo "seqrec: run 'ruff format .' (settings in pyproject.toml)" >&2; exit 1; }
  ruff check --quiet . || { echo "seqrec: fix the 'ruff check' findings above" >&2; exit 1; }
fi
exec python -m pytest -q -rs --durations=12 "$@"
