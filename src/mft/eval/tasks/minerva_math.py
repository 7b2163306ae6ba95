"""MATH, 4-shot Minerva prompts, one task per subject; the MATH score is the mean of the seven flex scores."""

from __future__ import annotations

from dataclasses import dataclass

from mft.eval import data, math_equiv
from mft.eval.parallel import pool_map
from mft.eval.tasks.base import Task, joined_prompt

# Task suffix -> the subject's name in the data (`type` in hendrycks_math, `subject` in MATH-500).
SUBJECTS = {
    "algebra": "Algebra",
    "counting_and_probability": "Counting & Probability",
    "geometry": "Geometry",
    "intermediate_algebra": "Intermediate Algebra",
    "number_theory": "Number Theory",
    "prealgebra": "Prealgebra",
    "precalculus": "Precalculus",
}


@dataclass
class MinervaMath(Task):
    default_shots = 4
    default_max_gen_toks = 1024
    default_fewshot = "minerva_math_4shot"
    stops = ("Problem:", "\n\n")
    primary_metric = "exact_match_flex"  # the number the authors report

    @property
    def subject(self) -> str:
        return self.name.removeprefix("minerva_math_")

    def __post_init__(self):
        self.hub = data.Source("EleutherAI/hendrycks_math", self.subject, "test")
        self.data_dir_files = (f"minerva_math/{self.subject}.jsonl", f"hendrycks_math/{self.subject}/test.jsonl",
                               "math500/test.jsonl", "math/test.jsonl")
        super().__post_init__()

    def select(self, rows: list[dict]) -> list[dict]:
        """A file of all subjects (MATH-500) keeps this subject's rows; a one-subject file keeps all."""
        wanted = SUBJECTS[self.subject]
        tagged = [row for row in rows if row.get("subject", row.get("type")) is not None]
        if not tagged:
            return rows
        return [row for row in rows if row.get("subject", row.get("type")) == wanted]

    def prepare(self, row: dict, index: int) -> dict:
        return {"doc_id": index, "native_id": row.get("unique_id", index), **row}

    def prompt(self, doc: dict) -> str:
        shots = [f"Problem:\n{ex['problem']}\n\nSolution: {ex['solution']}" for ex in self.exemplars()]
        return joined_prompt(shots, f"Problem:\n{doc['problem']}\n\nSolution:")

    def label(self, doc: dict) -> str:
        return math_equiv.gold_answer(doc)

    def score(self, docs, outputs, workers=None):
        math_equiv.warm_up()
        scored = pool_map(math_equiv.score_math, [(o, self.label(d)) for d, o in zip(docs, outputs)], workers,
                          desc=f"scoring {self.name}")
        return [{"metrics": {k: s[k] for k in ("exact_match", "exact_match_flex")},
                 "model_answer": s["model_answer"]} for s in scored]
