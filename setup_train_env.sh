#!/usr/bin/env bash
# Prepare the training environment on a GPU machine: a virtual environment (or conda env) with a CUDA build
# of PyTorch, this project with its [train] extra (DeepSpeed, peft, trackers), optionally flash-attn, and
# a final import check. Safe to run again: an existing environment is reused and only brought up to date.
# (The CPU test environment is bash/venv.sh's .venv/; this one is for the cluster.)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=bash/lib.sh
source "$ROOT/bash/lib.sh"
ENV_PATH="${MFT_TRAIN_ENV:-$HOME/venvs/mft-train}"
USE_CONDA=0
CUDA_TAG="${CUDA_TAG:-cu128}"
# Same torch as the CPU environment (requirements.txt), unless told otherwise.
TORCH_VERSION="${TORCH_VERSION:-$(sed -n 's/^torch==\(.*\)$/\1/p' "$ROOT/requirements.txt" | head -n1)}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
FLASH_ATTN=0

usage() {
    cat <<EOF
Usage: ./setup_train_env.sh [--prefix PATH] [--conda] [--cuda TAG] [--torch VERSION] [--python PYTHON]
                            [--flash-attn] [--help]

  --prefix PATH     where the environment lives (default \$MFT_TRAIN_ENV or ~/venvs/mft-train)
  --conda           create a conda environment at PATH instead of a venv (needs conda on PATH)
  --cuda TAG        PyTorch CUDA wheel index, e.g. cu126, cu128 (default \$CUDA_TAG or cu128)
  --torch VERSION   torch version (default \$TORCH_VERSION or requirements.txt's pin: ${TORCH_VERSION:-none})
  --python PYTHON   interpreter for a new venv (default python3.11 or python3)
  --flash-attn      also build flash-attn (needs nvcc and a few minutes; use_flash_attn: true in the configs)
  --help            this text

DeepSpeed is installed without prebuilt ops (DS_BUILD_OPS=0): its CUDA kernels are compiled just in time on
first use, which needs nvcc (CUDA_HOME) on the training machines. Activate afterwards with
  source PATH/bin/activate          (venv)     or     conda activate PATH     (conda)
Tokens (HF_TOKEN, WANDB_API_KEY) are read from the environment at run time; this script stores none.
EOF
}

while (($#)); do
    case "$1" in
        --prefix) ENV_PATH="$2"; shift 2 ;;
        --conda) USE_CONDA=1; shift ;;
        --cuda) CUDA_TAG="$2"; shift 2 ;;
        --torch) TORCH_VERSION="$2"; shift 2 ;;
        --python) PYTHON="$2"; shift 2 ;;
        --flash-attn) FLASH_ATTN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { echo "[setup_train_env] $*" >&2; }

mft_make_env setup_train_env "$ENV_PATH" "$USE_CONDA" "$PYTHON"
PY="$ENV_PATH/bin/python"
"$PY" -m pip install -q --upgrade pip wheel setuptools packaging ninja

torch_spec="torch${TORCH_VERSION:+==$TORCH_VERSION}"
say "installing $torch_spec ($CUDA_TAG)"
"$PY" -m pip install -q "$torch_spec" --index-url "https://download.pytorch.org/whl/$CUDA_TAG"

say "installing mft[train] from $ROOT (DeepSpeed ops are built just in time)"
(cd "$ROOT" && DS_BUILD_OPS=0 "$PY" -m pip install -q -e ".[train]" "$torch_spec" \
    --extra-index-url "https://download.pytorch.org/whl/$CUDA_TAG")

if ((FLASH_ATTN)); then
    say "building flash-attn (several minutes)"
    "$PY" -m pip install -q flash-attn --no-build-isolation
fi

say "checking the imports"
"$PY" - <<'EOF'
import accelerate, deepspeed, peft, torch, transformers
import mft.train.config  # noqa: F401
try:
    import flash_attn  # noqa: F401
    fa = "flash-attn " + flash_attn.__version__
except ImportError:
    fa = "no flash-attn (use_flash_attn: false, or rerun with --flash-attn)"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPUs visible), "
      f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
      f"deepspeed {deepspeed.__version__}, peft {peft.__version__}; {fa}")
EOF
if ((USE_CONDA)); then say "done: conda activate $ENV_PATH"; else say "done: source $ENV_PATH/bin/activate"; fi
