#!/usr/bin/env bash
# Quickstart command 2: run the test suite (creates .venv/ on first use). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
exec python -m pytest "$@"
