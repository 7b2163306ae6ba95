"""The task registry: olmes task names -> task classes, and the `minerva_math` group."""

from __future__ import annotations

from mft.eval.tasks.base import Task
from mft.eval.tasks.gsm8k import GSM8K
from mft.eval.tasks.humaneval import HumanEval, HumanEvalPlus
from mft.eval.tasks.ifeval import IFEval
from mft.eval.tasks.minerva_math import SUBJECTS, MinervaMath

TASKS: dict[str, type[Task]] = {
    "gsm8k": GSM8K,
    **{f"minerva_math_{subject}": MinervaMath for subject in SUBJECTS},
    "codex_humaneval": HumanEval,
    "codex_humanevalplus": HumanEvalPlus,
    "ifeval": IFEval,
}
GROUPS: dict[str, list[str]] = {"minerva_math": [f"minerva_math_{subject}" for subject in SUBJECTS]}

__all__ = ["GROUPS", "TASKS", "Task"]
