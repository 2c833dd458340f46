#!/usr/bin/env bash
# What the real-browser UI test (tests/test_ui_browser.py) needs: Debian's chromium and the playwright
# Python package. Playwright drives /usr/bin/chromium; its own browser download (`playwright install`)
# is never used. Idempotent: a second run only checks and returns.
# Usage: tests/browser/setup.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
PY=${1:-.venv/bin/python}

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    SUDO=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "browser-deps: /usr/bin/chromium is missing and apt-get needs root; the browser test will be skipped" >&2
    SUDO=skip
  fi
  if [ "$SUDO" != skip ]; then
    echo "browser-deps: installing Debian's chromium (apt-get)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
fi

if ! "$PY" -c "import playwright.sync_api" 2>/dev/null; then
  echo "browser-deps: installing the playwright package (pip; no browser download)" >&2
  "$PY" -m pip install --quiet playwright
fi
