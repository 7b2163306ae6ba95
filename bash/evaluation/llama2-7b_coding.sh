#!/usr/bin/env bash
# Evaluate a llama2-7b run on the coding tasks with the authors' protocol: bash/evaluation/llama2-7b_coding.sh MODEL
# (see bash/evaluation/common.sh --help for the path logic and the settings).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mft_eval_main coding "$@"
