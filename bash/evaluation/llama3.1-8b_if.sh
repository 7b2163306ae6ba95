#!/usr/bin/env bash
# Evaluate a llama3.1-8b run on the if tasks with the authors' protocol: bash/evaluation/llama3.1-8b_if.sh MODEL
# (see bash/evaluation/common.sh --help for the path logic and the settings).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mft_eval_main if "$@"
