"""`mft eval` and `mft report`. Imports of torch, transformers and vLLM happen only when a command runs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mft.settings import add_arguments, option

EVAL_EXAMPLE = """example:
  mft eval --model output/llama2_fft --task gsm8k --task minerva_math --output-dir results/fft
  mft eval --model M --task '{"task_name": "gsm8k", "num_shots": 8}' --model-type hf --limit 20 \\
      --data-dir packaged --output-dir /tmp/smoke
  mft eval --model M --task ifeval --model-type vllm --tensor-parallel-size 4 --gpu-memory-utilization 0.8 \\
      --output-dir results/m
tasks: gsm8k, minerva_math (the 7 minerva_math_<subject> tasks), codex_humaneval, codex_humanevalplus, ifeval
"""


@dataclass
class EvalOptions:
    """The flags of `mft eval` (`--kebab-case`, as published; `--snake_case` is accepted too)."""

    model: str | None = option("checkpoint folder, hub id owner/name, or a short name from `mft models list`",
                               required=True)
    tasks: list[str] | None = option('task name or olmes JSON, e.g. \'{"task_name": "gsm8k", "num_shots": 8}\' '
                                     "(repeatable)", flag="task", action="append", required=True, metavar="SPEC")
    output_dir: str | None = option("folder for metrics.json and the task-NNN-* files", required=True)
    model_type: str = option("generation backend; auto = vllm if installed and a GPU is visible, else hf", "auto",
                             choices=["auto", "vllm", "hf"])
    limit: int | None = option("first N documents of each task")
    batch_size: str = option("prompts per batch (hf backend): a number, or auto = as many as fit in free memory "
                             "(default)", "auto")
    data_dir: str | None = option("local data: gsm8k/test.jsonl, math500/test.jsonl, humaneval/test.jsonl, "
                                  "humanevalplus/test.jsonl, ifeval/train.jsonl (missing ones come from the hub); "
                                  "'packaged' = the copies shipped in the package (GSM8K test, MATH-500)")
    max_model_len: int | None = option("model length (prompt + generation); default 2048 (the protocol's), capped at "
                                       "the model's context with a log line; a longer value than the model's context "
                                       "is refused")
    workers: int | None = option("scoring/sandbox processes (default: CPU count)")
    tensor_parallel_size: int | None = option("vllm: GPUs per model (default: the largest that fits the visible GPUs "
                                              "and divides the model's attention heads; logged)", metavar="N")
    dtype: str = option("weights' dtype (auto, on a GPU: vLLM's rule, the checkpoint's dtype, the GPU's preferred one "
                        "for a float32 checkpoint or one the GPU lacks: bfloat16 from compute capability 8.0, float16 "
                        "before; hf on a CPU: the checkpoint's, float32 without native bf16; logged and recorded)",
                        "auto", choices=["auto", "bfloat16", "float16", "float32"])
    gpu_memory_utilization: float | None = option("vllm: fraction of each GPU's memory vLLM may take, in (0, 1] "
                                                  "(default: vLLM's)", metavar="F")
    quiet: bool = option("no progress bars", False)


@dataclass
class ReportOptions:
    """The arguments of `mft report`."""

    dirs: list[str] = option("result folders, or folders holding several; the first column found is the baseline",
                             positional=True, nargs="+", metavar="DIR")
    labels: list[str] | None = option("one name per result folder found, in order (default: folder names)")
    output: str = option("where to write the bar chart (PNG)", "report.png")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on GSM8K, MATH, HumanEval(+), IFEval (olmes protocol)",
                              description="Evaluate a model with the authors' olmes protocol; writes the olmes "
                              "output files. Finished tasks in --output-dir are reused.",
                              epilog=EVAL_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, EvalOptions, spelling="kebab")
    p.set_defaults(func=run_eval_command)

    r = subparsers.add_parser("report", help="compare result folders: markdown table and PNG bar chart",
                              description="Find each model's result folder (a folder with a metrics.json) in "
                              "the folders given and compare the models, one column each.")
    add_arguments(r, ReportOptions, spelling="kebab")
    r.set_defaults(func=run_report_command)


def run_eval_command(args) -> int:
    """`mft eval` (--quiet is set by mft.cli.main)."""
    from mft.eval.runner import run_eval
    from mft.hub import resolve_model

    model = resolve_model(args.model)  # a short name (`mft models list`) -> its cached folder
    summary = run_eval(model, args.tasks, args.output_dir, model_type=args.model_type, limit=args.limit,
                       batch_size=args.batch_size, data_dir=args.data_dir, max_model_len=args.max_model_len,
                       workers=args.workers, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                       gpu_memory_utilization=args.gpu_memory_utilization)
    print("\n".join(summary["all_primary_scores"]))
    return 0


def run_report_command(args) -> int:
    from mft.eval.report import run_report

    print(run_report(args.dirs, args.output, args.labels))
    return 0
