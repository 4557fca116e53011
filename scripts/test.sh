#!/usr/bin/env bash
# Sets up everything the tests need, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
python3 -m pytest -q "$@"
