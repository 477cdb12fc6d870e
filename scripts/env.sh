# Sourced by scripts/demo.sh and scripts/test.sh: make ./.venv hold everything seqrec needs.
#
# torch==2.13.0 goes in first and explicitly: a bare "torch" requirement would pull a multi-GB
# CUDA build. constraints.txt (run time) and constraints-test.txt (test tools) pin every other
# package so pip does not backtrack (minutes). A stamp of pyproject.toml + both files makes a second
# run skip the install.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SEQREC_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
stamp="$VENV/.seqrec-install-stamp"
want="$(cat "$REPO/pyproject.toml" "$REPO/constraints.txt" "$REPO/constraints-test.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "seqrec: creating virtual environment $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "seqrec: installing dependencies into $VENV (first run: a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -c "$REPO/constraints.txt" -c "$REPO/constraints-test.txt" \
    -e "$REPO[test]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
cd "$REPO"
