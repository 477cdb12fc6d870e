#!/usr/bin/env bash
# Quick start, command 2 (and CI): the test suite. Tests start their own services
# (local Ray, a SeaweedFS S3 server on loopback) and clean them up.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q -rs --durations=12 "$@"
