#!/usr/bin/env bash
# Shared by bash/training/run_*.sh and sweep_masktune_layers.sh: reads the cluster layout from the
# environment, builds the `accelerate launch` line and runs it (or prints it with DRY_RUN=1).
# Sourced by those scripts; `bash bash/training/common.sh --help` prints the settings.
set -euo pipefail

MFT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=../lib.sh
source "$MFT_ROOT/bash/lib.sh"

mft_usage() {
    cat <<'EOF'
Usage: bash/training/run_fft_<model>_<domain>.sh [--key=value ...]
       bash/training/run_local_masktune_<model>_<domain>.sh [--key=value ...]
       bash/training/sweep_masktune_layers.sh [--key=value ...]
       bash/training/run_baselines.sh [apply_masks.py flags ...]   (random and L1 masks on FFT_DIR)
  model: llama2-7b | llama3.1-8b    domain: math | coding | if
  Extra --key=value arguments are passed to scripts/finetune.py as config overrides.
  Paths (OUTPUT_ROOT, OUTPUT_DIR, BASE_MODEL, FFT_DIR, DS_CONFIG) are read from the folder you run the
  launcher in: the launchers never change folder, and the commands they print (DRY_RUN=1) name the repo's
  scripts and configs by absolute path, so they run as printed from that same folder.

Environment (nothing secret is ever written in these files; tokens come from the environment only):
  NUM_GPUS           GPUs per machine (default: counted with nvidia-smi)
  NUM_MACHINES       machines (default 1)
  MACHINE_RANK       this machine's rank, 0..NUM_MACHINES-1 (default 0)
  MAIN_PROCESS_IP    address of machine rank 0 (required when NUM_MACHINES > 1)
  MAIN_PROCESS_PORT  its port (default 29500)
  GLOBAL_BATCH_SIZE  sequences per optimizer step (default 128, the published value); the gradient
                     accumulation is GLOBAL_BATCH_SIZE / (NUM_GPUS * NUM_MACHINES * PER_DEVICE_BATCH_SIZE)
  PER_DEVICE_BATCH_SIZE  sequences per GPU per micro-batch (default 1)
  DS_CONFIG          DeepSpeed config (FFT default <repo>/configs/ds_configs/stage3_no_offloading_accelerate.conf);
                     "none" runs without DeepSpeed: the MFT default, DDP with frozen weights replicated
                     and the scores' optimizer state sharded (a 70B model needs a ZeRO-3 file instead)
  OUTPUT_ROOT        where run folders go (default output)
  OUTPUT_DIR         this run's folder (default: OUTPUT_ROOT/<run name>)
  BASE_MODEL         FFT only: start from this model instead of the config's Hub id (e.g. a local copy)
  FFT_DIR            MFT only: the FFT model to mask (default OUTPUT_ROOT/fft_<model>_<domain>)
  LAYERS             MFT only: masked layers, "4 5 6 7" or "4-7" (default: the config's)
  KEEP_RATIO         MFT only: fraction of weights kept (published key sparsity_*; default 0.9)
  REPORT_TO          trackers, e.g. wandb or tensorboard (default: the config's)
  HF_TOKEN, WANDB_API_KEY   read by the libraries from the environment, never passed on a command line
  PYTHON, ACCELERATE commands to use (default python, accelerate)
  DRY_RUN=1          print the commands instead of running them (no cluster variable needed: without
                     NUM_GPUS and a GPU it shows 8 GPUs per machine, MAIN_PROCESS_IP as a placeholder)
  SEED               baselines only: seed of the random masks (default 42)
  WINDOWS            sweep only: layer windows (default "0-3 4-7 8-11 12-15 16-19 20-23 24-27 28-31")
  MODEL, DOMAIN      sweep and baselines only (default llama2-7b, math)
EOF
}

mft_die() {
    echo "error: $*" >&2
    exit 1
}

mft_int() { # mft_int NAME VALUE: VALUE must be a non-negative integer
    [[ "$2" =~ ^[0-9]+$ ]] || mft_die "$1 must be a whole number, got '$2'"
}

# Cluster layout and derived numbers: NUM_GPUS, NUM_MACHINES, MACHINE_RANK, NUM_PROCESSES, GRAD_ACC, DS_CONFIG.
mft_setup() {
    local dry="${DRY_RUN:-0}"
    if [[ -z "${NUM_GPUS:-}" ]]; then
        if command -v nvidia-smi >/dev/null 2>&1; then
            NUM_GPUS="$(nvidia-smi -L | grep -c '^GPU' || true)"
        elif [[ "$dry" != 1 ]]; then
            mft_die "NUM_GPUS is not set and nvidia-smi is not available"
        fi
        if [[ "$dry" == 1 && "${NUM_GPUS:-0}" == 0 ]]; then  # a dry run needs no cluster: show an 8-GPU machine
            NUM_GPUS=8
            echo "DRY_RUN: NUM_GPUS is not set and no GPU is visible; showing the commands for 8 GPUs per machine" >&2
        fi
    fi
    NUM_MACHINES="${NUM_MACHINES:-1}"
    MACHINE_RANK="${MACHINE_RANK:-0}"
    GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-128}"
    PER_DEVICE_BATCH_SIZE="${PER_DEVICE_BATCH_SIZE:-1}"
    for v in NUM_GPUS NUM_MACHINES MACHINE_RANK GLOBAL_BATCH_SIZE PER_DEVICE_BATCH_SIZE; do mft_int "$v" "${!v}"; done
    ((NUM_GPUS > 0)) || mft_die "no GPU found (NUM_GPUS=0); set NUM_GPUS"
    ((NUM_MACHINES > 0 && PER_DEVICE_BATCH_SIZE > 0)) || mft_die "NUM_MACHINES and PER_DEVICE_BATCH_SIZE must be >= 1"
    ((MACHINE_RANK < NUM_MACHINES)) || mft_die "MACHINE_RANK=$MACHINE_RANK but NUM_MACHINES=$NUM_MACHINES"
    if ((NUM_MACHINES > 1)) && [[ -z "${MAIN_PROCESS_IP:-}" && "$dry" == 1 ]]; then
        MAIN_PROCESS_IP='$MAIN_PROCESS_IP'  # printed as a placeholder
    elif ((NUM_MACHINES > 1)) && [[ -z "${MAIN_PROCESS_IP:-}" ]]; then
        mft_die "NUM_MACHINES=$NUM_MACHINES needs MAIN_PROCESS_IP (the address of machine rank 0)"
    fi
    NUM_PROCESSES=$((NUM_GPUS * NUM_MACHINES))
    local per_step=$((NUM_PROCESSES * PER_DEVICE_BATCH_SIZE))
    ((GLOBAL_BATCH_SIZE % per_step == 0)) || mft_die "GLOBAL_BATCH_SIZE=$GLOBAL_BATCH_SIZE is not a multiple of" \
        "$NUM_PROCESSES processes x $PER_DEVICE_BATCH_SIZE per device; change NUM_GPUS or PER_DEVICE_BATCH_SIZE"
    GRAD_ACC=$((GLOBAL_BATCH_SIZE / per_step))
    DS_CONFIG="${DS_CONFIG:-$MFT_ROOT/configs/ds_configs/stage3_no_offloading_accelerate.conf}"
    OUTPUT_ROOT="${OUTPUT_ROOT:-output}"
    if [[ "${REPORT_TO:-}" == *wandb* && -z "${WANDB_API_KEY:-}" && "${WANDB_MODE:-}" != offline ]]; then
        echo "warning: REPORT_TO=$REPORT_TO but WANDB_API_KEY is not set; export it or WANDB_MODE=offline" >&2
    fi
}

# mft_launch CONFIG OUTPUT_DIR [finetune overrides...]
mft_launch() {
    local config="$1" out="$2"
    shift 2
    [[ -f "$config" ]] || mft_die "config not found: $config"
    local cmd=("${ACCELERATE:-accelerate}" launch --mixed_precision bf16 --num_machines "$NUM_MACHINES"
        --num_processes "$NUM_PROCESSES" --machine_rank "$MACHINE_RANK")
    if [[ -n "${MAIN_PROCESS_IP:-}" ]]; then
        cmd+=(--main_process_ip "$MAIN_PROCESS_IP" --main_process_port "${MAIN_PROCESS_PORT:-29500}")
    elif [[ -n "${MAIN_PROCESS_PORT:-}" ]]; then
        cmd+=(--main_process_port "$MAIN_PROCESS_PORT")
    fi
    if [[ "$DS_CONFIG" == none ]]; then
        ((NUM_PROCESSES > 1)) && cmd+=(--multi_gpu)  # DDP
    else
        [[ -f "$DS_CONFIG" ]] || mft_die "DeepSpeed config not found: $DS_CONFIG"
        cmd+=(--use_deepspeed --deepspeed_config_file "$DS_CONFIG")
        # accelerate's default multi-node DeepSpeed launcher is pdsh; each machine runs this script instead.
        ((NUM_MACHINES > 1)) && cmd+=(--deepspeed_multinode_launcher standard)
    fi
    cmd+=("$MFT_ROOT/scripts/finetune.py" "$config" --output_dir="$out"
        --per_device_train_batch_size="$PER_DEVICE_BATCH_SIZE" --gradient_accumulation_steps="$GRAD_ACC")
    if [[ -n "${REPORT_TO:-}" ]]; then cmd+=(--report_to="$REPORT_TO"); fi
    mft_run "${cmd[@]}" "$@"
}

mft_config_prefix() {
    case "$1" in
        llama2-7b) echo llama2_7b ;;
        llama3.1-8b) echo llama3.1_8b ;;
        *) mft_die "unknown model '$1' (expected llama2-7b or llama3.1-8b)" ;;
    esac
}

mft_check_domain() {
    case "$1" in
        math | coding | if) ;;
        *) mft_die "unknown domain '$1' (expected math, coding or if)" ;;
    esac
}

# "4-7" -> "4 5 6 7"; "4 5 6 7" and "4,5,6,7" -> "4 5 6 7".
mft_layers() {
    local spec="${1//,/ }"
    if [[ "$spec" =~ ^\ *([0-9]+)-([0-9]+)\ *$ ]]; then
        seq -s ' ' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
    else
        [[ "$spec" =~ ^[0-9\ ]+$ ]] || mft_die "LAYERS='$1': expected indices like \"4 5 6 7\" or a range \"4-7\""
        echo $spec # unquoted on purpose: collapses repeated spaces
    fi
}

# Published windows (LLaMA-2-7B); the LLaMA-3.1-8B configs use the same ones (see the README).
mft_default_layers() {
    case "$1" in
        math) echo "4 5 6 7" ;;
        coding) echo "20 21 22 23" ;;
        if) echo "0 1 2 3" ;;
    esac
}

# mft_begin MODEL DOMAIN [FIRST_ARG]: --help, the domain check, the cluster setup; sets MFT_CONFIG_PREFIX.
mft_begin() {
    if [[ "${3:-}" == -h || "${3:-}" == --help ]]; then mft_usage; exit 0; fi
    mft_check_domain "$2"
    mft_setup
    MFT_CONFIG_PREFIX="$(mft_config_prefix "$1")"
}

# mft_fft MODEL DOMAIN [overrides...]
mft_fft() {
    local model="$1" domain="$2"
    shift 2
    mft_begin "$model" "$domain" "${1:-}"
    local config="$MFT_ROOT/configs/train_configs/${MFT_CONFIG_PREFIX}_${domain}_fft.yaml"
    local out="${OUTPUT_DIR:-$OUTPUT_ROOT/fft_${model}_${domain}}"
    local extra=()
    if [[ -n "${BASE_MODEL:-}" ]]; then extra+=(--model_name_or_path="$BASE_MODEL"); fi
    mft_launch "$config" "$out" ${extra[@]+"${extra[@]}"} "$@"
}

# mft_masktune MODEL DOMAIN [overrides...]: train the mask, then bake it into the FFT weights (mask_applied/).
mft_masktune() {
    local model="$1" domain="$2"
    shift 2
    # MFT's layout (issue 12): no DeepSpeed, DDP, frozen weights replicated in bf16, scores' AdamW state
    # sharded; fits 7B/8B on 80 GB GPUs. DS_CONFIG=<file> picks DeepSpeed (70B: ZeRO-3).
    DS_CONFIG="${DS_CONFIG:-none}"
    mft_begin "$model" "$domain" "${1:-}"
    local config="$MFT_ROOT/configs/train_configs/${MFT_CONFIG_PREFIX}_${domain}_local_masktune.yaml"
    local layers keep="${KEEP_RATIO:-0.9}"
    layers="$(mft_layers "${LAYERS:-$(mft_default_layers "$domain")}")"
    local first="${layers%% *}" last="${layers##* }"
    local fft_dir="${FFT_DIR:-$OUTPUT_ROOT/fft_${model}_${domain}}"
    local out="${OUTPUT_DIR:-$OUTPUT_ROOT/masktune_${model}_local_${first}-${last}-layers_${keep}_${domain}}"
    if [[ "${DRY_RUN:-0}" != 1 && ! -d "$fft_dir" ]]; then
        mft_die "FFT model not found: $fft_dir (run bash/training/run_fft_${model}_${domain}.sh first, or set FFT_DIR)"
    fi
    mft_launch "$config" "$out" --model_name_or_path="$fft_dir" --masked_layers="$layers" \
        --sparsity_attn="$keep" --sparsity_mlp="$keep" "$@"
    if ((MACHINE_RANK == 0)); then
        mft_run "${PYTHON:-python}" "$MFT_ROOT/scripts/apply_masks.py" --base_model_name_or_path "$fft_dir" \
            --mask_model_name_or_path "$out" --output_dir "$out/mask_applied"
    else
        echo "machine rank $MACHINE_RANK: training done; machine rank 0 writes $out/mask_applied" >&2
    fi
}

# mft_baselines MODEL DOMAIN [apply_masks.py flags...]: the random and L1 baselines at an MFT run's layers and
# keep ratio, built on the FFT checkpoint (apply refuses a checkpoint that is already masked).
mft_baselines() {
    local model="$1" domain="$2"
    shift 2
    if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then mft_usage; exit 0; fi
    mft_check_domain "$domain"
    mft_config_prefix "$model" >/dev/null
    OUTPUT_ROOT="${OUTPUT_ROOT:-output}"
    local layers keep="${KEEP_RATIO:-0.9}" kind flag
    layers="$(mft_layers "${LAYERS:-$(mft_default_layers "$domain")}")"
    local first="${layers%% *}" last="${layers##* }"
    local fft_dir="${FFT_DIR:-$OUTPUT_ROOT/fft_${model}_${domain}}"
    if [[ "${DRY_RUN:-0}" != 1 && ! -d "$fft_dir" ]]; then
        mft_die "FFT model not found: $fft_dir (run bash/training/run_fft_${model}_${domain}.sh first, or set FFT_DIR)"
    fi
    for kind in random l1; do
        flag=--random_masks
        [[ "$kind" == l1 ]] && flag=--use_l1_mask
        mft_run "${PYTHON:-python}" "$MFT_ROOT/scripts/apply_masks.py" --base_model_name_or_path "$fft_dir" "$flag" \
            --seed "${SEED:-42}" --masked_layers "$layers" --subnet_mode both --sparsity_attn "$keep" \
            --sparsity_mlp "$keep" --save_masks \
            --output_dir "$OUTPUT_ROOT/${kind}_${model}_${first}-${last}-layers_${keep}_${domain}" "$@"
    done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    mft_usage
fi
