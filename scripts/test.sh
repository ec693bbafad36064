#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite.
#   - a virtual environment (.venv, or $VENV) with the package and its [dev] extras
#   - Debian's chromium for the browser tests (apt-get, as root or through sudo)
# Two pytest runs: the library/async/notebook suite, then the browser (UI) tests,
# kept apart because the served app and pytest-asyncio both want the event loop.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'

if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

mkdir -p test-artifacts
"$PY" -m pytest -q -p no:cacheprovider --nbmake tests notebooks "$@"
"$PY" -m pytest -q -p no:cacheprovider -m ui tests/ui "$@"
