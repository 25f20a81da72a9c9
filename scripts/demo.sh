#!/usr/bin/env bash
# Set up Squall and put the example workflows through it: validate them, show their DAG.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
set -x
.venv/bin/squall workflow validate examples/*.yaml
.venv/bin/squall workflow graph examples/pipeline.yaml
