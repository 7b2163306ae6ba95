#!/usr/bin/env bash
# Shell helpers shared by the launchers (bash/training/common.sh, bash/evaluation/common.sh) and the setup
# scripts (setup_train_env.sh, setup_eval_env.sh). Sourced, never run.

# mft_run CMD [ARGS...]: run a command, or print it (shell-quoted, one line) when DRY_RUN=1.
mft_run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        local quoted
        printf -v quoted '%q ' "$@"
        echo "${quoted% }"
    else
        "$@"
    fi
}

# mft_make_env TAG PATH USE_CONDA PYTHON: a Python environment at PATH, created unless one is there: a conda
# environment (Python 3.11) when USE_CONDA is 1, else a venv made by PYTHON. TAG prefixes the messages.
mft_make_env() {
    local tag="$1" path="$2" use_conda="$3" python="$4"
    if ((use_conda)); then
        command -v conda >/dev/null 2>&1 || { echo "error: --conda given but conda is not on PATH" >&2; exit 1; }
    fi
    [[ -x "$path/bin/python" ]] && return 0
    if ((use_conda)); then
        echo "[$tag] creating conda environment $path" >&2
        conda create -y -p "$path" python=3.11 pip
    else
        echo "[$tag] creating virtual environment $path with $python" >&2
        "$python" -m venv "$path"
    fi
}
