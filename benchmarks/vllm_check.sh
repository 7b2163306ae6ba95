#!/usr/bin/env bash
# vLLM check (issue 16): `mft eval --model-type vllm` on a tiny model built in place (no downloads), next to
# the transformers backend on the same prompts, so a GPU machine with vLLM checks the real vLLM path in one
# command. Needs vLLM importable (./setup_eval_env.sh); without it the script says so and exits 2.
#
#   bash benchmarks/vllm_check.sh                  # about a minute on one GPU once vLLM is imported
#   PYTHON=/path/to/env/bin/python bash benchmarks/vllm_check.sh --limit 32 --keep /tmp/vllm_check
#
# Model: Llama, 2 layers x 256 hidden, 4 heads (head size 64, 2 key/value heads), max length 2048, float32
# on disk (so vLLM runs it in bfloat16: the --dtype default), with a byte-level tokenizer trained on the
# packaged GSM8K test set plus ChatML's <|im_start|>/<|im_end|> as added special tokens. Task: gsm8k, 2 shots,
# 32 new tokens, the first --limit documents of the packaged data. Checks: the vLLM run writes a prediction
# for every document with 1..32 tokens and the gsm8k stops cut from the text; tensor parallel size and
# dtype are logged by mft eval. Agreement with the hf backend is printed as information (bf16 kernels differ
# in the last bits, and a random model's near-ties turn that into different tokens). Capped at 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  echo "vllm_check: vLLM is not importable by $PY; build the evaluation environment with ./setup_eval_env.sh" \
    "and run PYTHON=<env>/bin/python bash benchmarks/vllm_check.sh" >&2
  exit 2
fi
exec timeout 600 "$PY" - "$@" <<'PYEOF'
import argparse, json, os, subprocess, sys, tempfile
from pathlib import Path

sys.path[:0] = ["src"]
parser = argparse.ArgumentParser(prog="vllm_check.sh")
parser.add_argument("--limit", type=int, default=16, help="GSM8K documents")
parser.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
parser.add_argument("--extra", default="", help="more mft eval flags for the vllm run, e.g. '--tensor-parallel-size 1'")
args = parser.parse_args()

import vllm
from mft.eval.data import packaged_data_dir
from mft.tiny import tiny_model, train_tokenizer

work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vllm_check_"))
work.mkdir(parents=True, exist_ok=True)
model_dir = work / "tiny_chatml"
rows = [json.loads(line) for line in (packaged_data_dir() / "gsm8k" / "test.jsonl").read_text().splitlines()[:300]]
tokenizer = train_tokenizer([r["question"] + "\n" + r["answer"] for r in rows], vocab_size=1000)
tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
model = tiny_model("llama", vocab_size=len(tokenizer), hidden=256, num_layers=2, max_position_embeddings=2048)
model.save_pretrained(model_dir)
tokenizer.save_pretrained(model_dir)
print(f"vllm {vllm.__version__}; model {model_dir}; python {sys.version.split()[0]}", flush=True)

task = json.dumps({"task_name": "gsm8k", "num_shots": 2, "generation_kwargs": {"max_gen_toks": 32}})
outputs = {}
for model_type in ("vllm", "hf"):
    out = work / model_type
    command = [sys.executable, "-m", "mft", "eval", "--model", str(model_dir), "--task", task, "--limit",
               str(args.limit), "--data-dir", "packaged", "--model-type", model_type, "--output-dir", str(out)]
    if model_type == "vllm":
        command += ["--gpu-memory-utilization", "0.3", *args.extra.split()]
    print("$ " + " ".join(command), flush=True)
    path = os.pathsep.join(p for p in ("src", os.environ.get("PYTHONPATH", "")) if p)
    result = subprocess.run(command, env={**os.environ, "PYTHONPATH": path})
    if result.returncode:
        sys.exit(f"vllm_check: FAILED: mft eval --model-type {model_type} exited {result.returncode}")
    (predictions,) = out.glob("task-*-gsm8k-predictions.jsonl")
    outputs[model_type] = [json.loads(line)["model_output"][0] for line in predictions.read_text().splitlines()]

vllm_rows, hf_rows = outputs["vllm"], outputs["hf"]
problems = []
if len(vllm_rows) != args.limit:
    problems.append(f"{len(vllm_rows)} predictions for {args.limit} documents")
problems += [f"document {i}: {r['num_tokens']} tokens" for i, r in enumerate(vllm_rows)
             if not 1 <= r["num_tokens"] <= 32]
stops = ["Question:", "</s>", "<|im_end|>", "\n\n"]
problems += [f"document {i}: stop string left in the text" for i, r in enumerate(vllm_rows)
             if any(s in r["continuation"] for s in stops)]
same = sum(a["continuation"] == b["continuation"] for a, b in zip(vllm_rows, hf_rows))
print(f"RESULT vllm eval: {len(vllm_rows)} predictions, tokens {[r['num_tokens'] for r in vllm_rows]}")
print(f"RESULT vllm vs hf (information): {same}/{len(vllm_rows)} identical continuations")
if not args.keep:
    import shutil

    shutil.rmtree(work)
if problems:
    sys.exit("vllm_check: FAILED: " + "; ".join(problems))
print("vllm_check: ok")
PYEOF
