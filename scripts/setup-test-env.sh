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
# Real photos and landmark annotations from the registries (PyPI sdist, Debian source package) into a cache
# outside the repo (~/.cache/visrec/fixtures or $VISREC_FIXTURES), with a manifest of sources and checksums.
PY="${PYTHON_BIN:-.venv/bin/python}"
if "$PY" -m visrec.data.fixtures; then
  echo "real-face fixtures: ready"
else
  echo "real-face fixtures: could not be fetched; the real_faces tests will skip with the reason"
fi
echo "test environment ready"
