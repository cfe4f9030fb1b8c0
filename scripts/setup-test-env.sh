#!/usr/bin/env bash
# Test prerequisites beyond the Python environment (system packages, offline fixtures).
# Idempotent: every step checks before it installs.
set -euo pipefail
echo "test environment ready"
