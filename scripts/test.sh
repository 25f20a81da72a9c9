#!/usr/bin/env bash
# Set up Squall with its test tools, then lint, type-check and run the tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k broken -x).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
