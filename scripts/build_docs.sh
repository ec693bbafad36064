#!/usr/bin/env bash
# Build the documentation site into site/ in strict mode: a broken link, a missing
# cross-reference, an unknown generated block or any other warning fails the build.
#   bash scripts/build_docs.sh               # uses $PYTHON, else .venv/bin/python, else python3
#   bash scripts/build_docs.sh -d /tmp/site  # extra arguments go to `mkdocs build`
# The measured profile table (docs/generated/profiles.md) is not remeasured here: run
# `python scripts/profile_table.py` after changing the encodings, the planner or the profiles.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import mkdocs, mkdocstrings, material" 2>/dev/null; then
  echo "mkdocs, mkdocstrings-python and mkdocs-material are missing for $PY: pip install -e '.[dev]'" >&2
  exit 1
fi
export NO_MKDOCS_2_WARNING=1
exec "$PY" -m mkdocs build --strict "$@"
