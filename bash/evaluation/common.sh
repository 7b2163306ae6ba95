#!/usr/bin/env bash
# Shared by bash/evaluation/<model>_<domain>.sh: the original scripts' model/output path logic, then one
# `mft eval` run over the domain's tasks (or, with EVAL_HARNESS=olmes, the authors' per-task olmes calls).
# `bash bash/evaluation/common.sh --help` prints the settings.
set -euo pipefail

MFT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=../lib.sh
source "$MFT_ROOT/bash/lib.sh"
MATH_SUBJECTS=(algebra counting_and_probability geometry intermediate_algebra number_theory prealgebra precalculus)

mft_eval_usage() {
    cat <<'EOF_USAGE'
Usage: bash/evaluation/<model>_<domain>.sh MODEL [extra mft eval flags ...]
  model: llama2-7b | llama3.1-8b    domain: math (GSM8K + MATH) | coding (HumanEval, HumanEval+) | if (IFEval)
  MODEL:
    a bare run name (no "/") whose folder OUTPUT_ROOT/MODEL holds a model (config.json) or mask_applied/:
      that run; an MFT run (it has mask_applied/, or its name contains "masktune") is evaluated through
      OUTPUT_ROOT/MODEL/mask_applied (refused if missing; DRY_RUN warns)
    anything else: a model folder or hub id, used exactly as given (absolute paths too)
  Results go beside a local model folder: MODEL_PATH/eval_output. Anything that is not a local folder (a hub
  id such as gpt2 or meta-llama/Llama-2-7b-hf, an mft short name) puts them under OUTPUT_ROOT/MODEL/eval_output,
  never in a folder named like the model in the current folder.
  Paths (MODEL, OUTPUT_ROOT, EVAL_OUTPUT) are read from the folder you run the launcher in, and the printed
  DRY_RUN commands run from that folder (the launchers never change folder).
Environment:
  OUTPUT_ROOT    where run folders live (default output)
  EVAL_OUTPUT    results folder (default: beside the model, as above)
  MODEL_TYPE     vllm (default) | hf | auto
  TENSOR_PARALLEL_SIZE, DTYPE, GPU_MEMORY_UTILIZATION
                 passed to mft eval as --tensor-parallel-size, --dtype, --gpu-memory-utilization when set
                 (default: mft eval's, which it logs); refused with EVAL_HARNESS=olmes (olmes has its own flags)
  EVAL_HARNESS   mft (default) | olmes: run a real `olmes` per task, as the authors did, then
                 scripts/get_math_score.py for MATH
  MFT, OLMES, PYTHON   commands to use (default mft, olmes, python)
  DRY_RUN=1      print the commands instead of running them
Results: EVAL_OUTPUT/metrics.json and task-NNN-* files (mft), one folder per task (olmes); for math also
EVAL_OUTPUT/math/<subject>/metrics.json and EVAL_OUTPUT/math/task_scores_flex.jsonl. Compare runs with
  mft report output/fft_llama2-7b_math/eval_output \
    output/masktune_llama2-7b_local_4-7-layers_0.9_math/mask_applied/eval_output
EOF_USAGE
}

# mft_eval_paths MODEL: sets MODEL_PATH and EVAL_OUTPUT (see the usage text). A model that is not a local
# folder (a bare hub id or mft short name such as gpt2, an owner/name hub id) gets OUTPUT_ROOT/MODEL/eval_output,
# never ./MODEL/eval_output: a folder named like the model in the current folder would be loaded as the model
# next time ("a local folder of the same name wins"). For the same reason OUTPUT_ROOT/MODEL counts as a run only
# when it holds a model (config.json) or mask_applied/, or is an MFT run by name.
mft_eval_paths() {
    local name="$1" root="${OUTPUT_ROOT:-output}" run
    root="${root%/}"
    run="$root/$name"
    if [[ "$name" != */* && -n "$name" && -d "$run" ]] \
        && [[ -f "$run/config.json" || -d "$run/mask_applied" || "$name" == *masktune* ]]; then  # a run name
        if [[ -d "$run/mask_applied" || "$name" == *masktune* ]]; then
            MODEL_PATH="$run/mask_applied"
            if [[ ! -d "$MODEL_PATH" ]]; then
                local hint="mft apply --base_model_name_or_path <the FFT model> --mask_model_name_or_path $run"
                hint+=" --output_dir $MODEL_PATH"
                if [[ "${DRY_RUN:-0}" != 1 ]]; then
                    echo "error: MFT run $run has no mask_applied/ (the FFT weights with the mask baked in);" \
                        "create it first: $hint" >&2
                    return 1
                fi
                echo "warning: $MODEL_PATH does not exist yet; create it first: $hint" >&2
            fi
        else
            MODEL_PATH="$run"
        fi
    else
        MODEL_PATH="$name"
    fi
    MODEL_PATH="${MODEL_PATH%/}"
    if [[ -z "${EVAL_OUTPUT:-}" ]]; then
        # a local path as `mft eval` tells them apart: it exists, starts with / . ~, has more than one "/",
        # or (with one "/") its parent folder exists; otherwise a bare name or owner/name is a hub id / short name
        local slashes="${MODEL_PATH//[^\/]/}"
        if [[ -d "$MODEL_PATH" || "$MODEL_PATH" == [/.~]* || ${#slashes} -gt 1 ]] \
            || [[ ${#slashes} == 1 && -d "$(dirname "$MODEL_PATH")" ]]; then
            EVAL_OUTPUT="$MODEL_PATH/eval_output"
        else
            EVAL_OUTPUT="$root/$MODEL_PATH/eval_output"
        fi
    fi
}

# mft_eval_tasks DOMAIN: the olmes task specs of a domain, one per line.
mft_eval_tasks() {
    case "$1" in
        math)
            echo '{"task_name": "gsm8k", "num_shots": 8}'
            for subject in "${MATH_SUBJECTS[@]}"; do
                echo "{\"task_name\": \"minerva_math_$subject\", \"num_shots\": 4}"
            done ;;
        coding)
            echo '{"task_name": "codex_humaneval"}'
            echo '{"task_name": "codex_humanevalplus"}' ;;
        if) echo '{"task_name": "ifeval"}' ;;
        *) echo "error: unknown domain '$1' (math, coding, if)" >&2; return 1 ;;
    esac
}

# olmes writes one folder per call; MATH subjects go to math/<subject>, where get_math_score.py looks.
mft_olmes_dir() {
    local name
    name="$(sed -n 's/.*"task_name": "\([^"]*\)".*/\1/p' <<<"$1")"
    if [[ "$name" == minerva_math_* ]]; then
        echo "$EVAL_OUTPUT/math/${name#minerva_math_}"
    else
        echo "$EVAL_OUTPUT/$name"
    fi
}

mft_eval_main() { # mft_eval_main DOMAIN MODEL [extra flags...]
    local domain="$1"
    shift
    if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
        mft_eval_usage
        [[ $# -ge 1 ]] && return 0 || return 2
    fi
    local model="$1"
    shift
    mft_eval_paths "$model" || return 1
    local -a specs
    mapfile -t specs < <(mft_eval_tasks "$domain")
    echo "[eval] $domain: $MODEL_PATH -> $EVAL_OUTPUT (${EVAL_HARNESS:-mft})" >&2
    if [[ "${EVAL_HARNESS:-mft}" == olmes ]]; then
        command -v "${OLMES:-olmes}" >/dev/null 2>&1 || [[ "${DRY_RUN:-0}" == 1 ]] \
            || { echo "error: EVAL_HARNESS=olmes but '${OLMES:-olmes}' is not installed" >&2; return 1; }
        # olmes has no such flags (its vLLM settings go through its own --model-args / --gpus): refuse
        # rather than drop them silently.
        local var
        for var in TENSOR_PARALLEL_SIZE DTYPE GPU_MEMORY_UTILIZATION; do
            if [[ -n "${!var:-}" ]]; then
                echo "error: $var is an mft eval setting; with EVAL_HARNESS=olmes pass olmes' own flags after" \
                    "MODEL (e.g. --gpus, --model-args) and unset $var" >&2
                return 1
            fi
        done
        for spec in "${specs[@]}"; do
            mft_run "${OLMES:-olmes}" --model "$MODEL_PATH" --model-type "${MODEL_TYPE:-vllm}" \
                --task "$spec" --output-dir "$(mft_olmes_dir "$spec")" "$@"
        done
        if [[ "$domain" == math ]]; then
            mft_run "${PYTHON:-python}" "$MFT_ROOT/scripts/get_math_score.py" "$EVAL_OUTPUT"
        fi
    elif [[ "${EVAL_HARNESS:-mft}" == mft ]]; then
        local -a task_args=() vllm_args=()
        for spec in "${specs[@]}"; do task_args+=(--task "$spec"); done
        [[ -n "${TENSOR_PARALLEL_SIZE:-}" ]] && vllm_args+=(--tensor-parallel-size "$TENSOR_PARALLEL_SIZE")
        [[ -n "${DTYPE:-}" ]] && vllm_args+=(--dtype "$DTYPE")
        [[ -n "${GPU_MEMORY_UTILIZATION:-}" ]] && vllm_args+=(--gpu-memory-utilization "$GPU_MEMORY_UTILIZATION")
        mft_run "${MFT:-mft}" eval --model "$MODEL_PATH" --model-type "${MODEL_TYPE:-vllm}" \
            "${task_args[@]}" "${vllm_args[@]}" --output-dir "$EVAL_OUTPUT" "$@"
    else
        echo "error: EVAL_HARNESS must be mft or olmes, got '${EVAL_HARNESS}'" >&2
        return 1
    fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    mft_eval_usage
fi
