#!/usr/bin/env bash
# Test prerequisites beyond the Python environment (system packages, offline fixtures).
# Idempotent: every step checks before it installs. Where a step cannot run (no root, no apt), it says so
# and the tests that need it skip with that reason.
set -uo pipefail

# Headless Chromium + its WebDriver (Debian packages) for the web-page test (tests/test_serve_browser.py).
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  echo "chromium: present"
elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1)) &&
    echo "chromium: installed" || echo "chromium: apt-get could not install it; the browser test will skip"
else
  echo "chromium: not installed and no root apt-get here; the browser test will skip"
fi
# axe-core (npm) for the web console's accessibility check (tests/test_serve_browser.py), pinned, into a cache
# outside the repo; the test injects its axe.min.js into the page.
TOOLS="$HOME/.cache/visrec/tools"
if [ -f "$TOOLS/node_modules/axe-core/axe.min.js" ]; then
  echo "axe-core: present"
elif command -v npm >/dev/null; then
  mkdir -p "$TOOLS" && npm install --prefix "$TOOLS" --no-audit --no-fund --silent axe-core@4.14.1 >/dev/null 2>&1 &&
    echo "axe-core: installed" || echo "axe-core: npm could not install it; the browser test will fail and say so"
else
  echo "axe-core: npm is not installed; the browser test will fail and say so"
fi
# Real photos and landmark annotations from the registries (PyPI sdist, Debian source package) into a cache
# outside the repo (~/.cache/visrec/fixtures or $VISREC_FIXTURES), with a manifest of sources and checksums.
PY="${PYTHON_BIN:-.venv/bin/python}"
if "$PY" -m visrec.data.fixtures; then
  echo "real-face fixtures: ready"
else
  echo "real-face fixtures: could not be fetched; the real_faces tests will skip with the reason"
fi
echo "test environment ready"
