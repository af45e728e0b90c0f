#!/usr/bin/env bash
# Create .venv and install the project with its pinned dev dependencies (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip==25.3"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
