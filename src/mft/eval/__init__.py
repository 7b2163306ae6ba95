"""Evaluation: the authors' olmes protocol (docs: EVAL_SPEC) for GSM8K, MATH, HumanEval(+) and IFEval.

Pipeline: `specs` (what to run) -> `tasks` (data, prompts, scoring) -> `backends` (vLLM or transformers
generation) -> `outputs` (the olmes file layout, reuse of finished tasks) -> `report` (tables, charts).
Model-written code only ever runs inside `sandbox`.
"""
