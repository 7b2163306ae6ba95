#!/usr/bin/env bash
# MFT over several windows of masked layers (one run and one mask_applied/ per window), to find the best
# window for a model and domain. MODEL (llama2-7b), DOMAIN (math) and WINDOWS
# ("0-3 4-7 8-11 12-15 16-19 20-23 24-27 28-31") from the environment; the rest as for every launcher: --help.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then mft_usage; exit 0; fi
[[ -z "${OUTPUT_DIR:-}" ]] || mft_die "OUTPUT_DIR would be shared by every window; set OUTPUT_ROOT instead"
[[ -z "${LAYERS:-}" ]] || mft_die "LAYERS is set; a sweep takes its windows from WINDOWS"
for window in ${WINDOWS:-0-3 4-7 8-11 12-15 16-19 20-23 24-27 28-31}; do
    (LAYERS="$window" mft_masktune "${MODEL:-llama2-7b}" "${DOMAIN:-math}" "$@")
done
