#!/usr/bin/env bash
# Quick start, command 1: the local nightly pipeline on the embedded synthetic dataset.
# Writes everything under ./seqrec-data (or $SEQREC_ROOT) and prints a few recommendation rows.
source "$(dirname "$0")/env.sh"
exec seqrec nightly --demo --root "${SEQREC_ROOT:-seqrec-data}" --config configs/demo.yaml "$@"
