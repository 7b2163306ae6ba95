#!/usr/bin/env bash
# Quickstart command 1: run the CPU demo (creates .venv/ on first use). Extra arguments go to `mft demo`.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
exec mft demo "$@"
