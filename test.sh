#!/usr/bin/env bash
# Runs the test suite (after making sure setup.sh has installed everything).
# Extra arguments go to pytest. APPLIANCE_PUREPYTHON=1 runs it on the pure-Python build.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh >&2
exec .venv/bin/python -m pytest "$@"
