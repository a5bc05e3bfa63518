#!/usr/bin/env bash
# Headless Chromium for tests/test_serve_browser.py: Debian's chromium + chromium-driver, and the
# Playwright Python client (which drives that Chromium; `playwright install` is never run, since
# it downloads browsers from a CDN).
#   usage: tools/install_browser.sh [VENV]   (default: .venv next to this script's repository)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "install_browser: need root (or sudo) for apt-get" >&2; exit 1; }
        SUDO="sudo"
    fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium chromium-driver
fi
/usr/bin/chromium --version

if [ ! -x "$VENV/bin/python" ]; then
    echo "install_browser: no virtualenv at $VENV (give its path as the first argument)" >&2
    exit 1
fi
"$VENV/bin/python" -m pip install --quiet "playwright>=1.45"
"$VENV/bin/python" -c "import playwright; from playwright.sync_api import sync_playwright; print('playwright ok')"
