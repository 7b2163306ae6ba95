#!/usr/bin/env bash
# Prepare the evaluation environment on a GPU machine: a virtual environment (or conda env) with vLLM and
# this project's [vllm] extra (vLLM brings its own CUDA build of PyTorch), NLTK's punkt_tab data for the
# IFEval checkers, and a final check that vLLM sees the GPUs and the code sandbox works. Safe to run
# again: an existing environment is reused and brought up to date.
# (The CPU test environment is bash/venv.sh's .venv/; this one is for the cluster.)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=bash/lib.sh
source "$ROOT/bash/lib.sh"
ENV_PATH="${MFT_EVAL_ENV:-$HOME/venvs/mft-eval}"
USE_CONDA=0
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VLLM_SPEC="${VLLM_SPEC:-}"
CHECK=1

usage() {
    cat <<EOF_USAGE
Usage: ./setup_eval_env.sh [--prefix PATH] [--conda] [--python PYTHON] [--vllm SPEC] [--no-check] [--help]

  --prefix PATH     where the environment lives (default \$MFT_EVAL_ENV or ~/venvs/mft-eval)
  --conda           create a conda environment at PATH instead of a venv (needs conda on PATH)
  --python PYTHON   interpreter for a new venv (default python3.11 or python3)
  --vllm SPEC       pin vLLM, e.g. "vllm==0.11.1" (default: the newest the [vllm] extra allows, >=0.11.1;
                    0.11.1 is the oldest that declares the transformers it works with)
  --no-check        skip the final GPU / sandbox check (e.g. on a login node without GPUs)
  --help            this text

Afterwards:
  source PATH/bin/activate   (or: conda activate PATH)
  bash/evaluation/llama2-7b_math.sh masktune_llama2-7b_math
Keep vLLM's environment separate from the training one: vLLM pins its own torch version.
EOF_USAGE
}

while (($#)); do
    case "$1" in
        --prefix) ENV_PATH="$2"; shift 2 ;;
        --conda) USE_CONDA=1; shift ;;
        --python) PYTHON="$2"; shift 2 ;;
        --vllm) VLLM_SPEC="$2"; shift 2 ;;
        --no-check) CHECK=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { echo "[setup_eval_env] $*" >&2; }

mft_make_env setup_eval_env "$ENV_PATH" "$USE_CONDA" "$PYTHON"
PY="$ENV_PATH/bin/python"

say "installing mft[vllm] ${VLLM_SPEC:+with $VLLM_SPEC }into $ENV_PATH"
"$PY" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$PY" -m pip install -q -e "$ROOT[vllm]" $VLLM_SPEC

say "writing NLTK's punkt_tab data for the IFEval checkers (no download)"
"$PY" -c "from mft.eval.punkt_data import ensure_punkt; print(ensure_punkt())"

if ((CHECK)); then
    say "checking vLLM, the GPUs and the code sandbox"
    "$PY" - <<'EOF_CHECK'
import torch

from mft.errors import MftError
from mft.eval import sandbox
from mft.eval.backends.vllm import check_vllm_version, cuda_problem, driver_cuda_version

gpus = torch.cuda.device_count()
driver = driver_cuda_version()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), NVIDIA driver for CUDA "
      f"{'.'.join(map(str, driver)) if driver else 'none'}, {gpus} GPU(s) visible")
problem = cuda_problem(driver, torch.version.cuda, gpus)
if problem and problem[0]:
    raise SystemExit(f"the GPU is not usable: {problem[1]}")
if problem:
    print(f"warning: {problem[1]}")
import vllm

print(f"vllm {vllm.__version__}")
try:
    check_vllm_version(vllm.__version__)
except MftError as exc:
    raise SystemExit(str(exc))
ok, hostile = sandbox.run_programs(["assert 1 + 1 == 2", "import os\nos._exit(0)"], timeout_s=3, workers=2)
if not ok.passed or hostile.passed:
    raise SystemExit(f"the code sandbox does not work here: {ok} {hostile}")
print("sandbox ok")
EOF_CHECK
fi
say "done: source $ENV_PATH/bin/activate"
