"""IFEval, 0-shot: the verifiable-instruction checkers of Zhou et al. (2023), strict and loose.

The checkers are lm-eval's packaging of the Google Research implementation, used as a library. They
need NLTK's `punkt_tab` (made available offline by `mft.eval.punkt_data`) and `langdetect`, whose
random seed is fixed here so language checks give the same answer on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

from mft.eval import data
from mft.eval.tasks.base import Task

METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


def _checkers():
    from mft.eval.punkt_data import ensure_punkt

    ensure_punkt()  # before the import: lm-eval's module tries to download punkt_tab when it is missing
    import langdetect

    langdetect.DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval import utils

    return utils


def check_response(doc: dict, response: str) -> dict:
    """The four IFEval judgements for one response (instruction-level ones are lists of booleans)."""
    checkers = _checkers()
    example = checkers.InputExample(key=doc.get("key", 0), instruction_id_list=doc["instruction_id_list"],
                                    prompt=doc["prompt"], kwargs=doc["kwargs"])
    strict = checkers.test_instruction_following_strict(example, response)
    loose = checkers.test_instruction_following_loose(example, response)
    return {
        "prompt_level_strict_acc": int(strict.follow_all_instructions),
        "inst_level_strict_acc": [int(x) for x in strict.follow_instruction_list],
        "prompt_level_loose_acc": int(loose.follow_all_instructions),
        "inst_level_loose_acc": [int(x) for x in loose.follow_instruction_list],
    }


@dataclass
class IFEval(Task):
    default_shots = 0
    default_max_gen_toks = 1280
    stops = ()  # EOS only
    primary_metric = "inst_level_loose_acc"
    hub = data.Source("google/IFEval", None, "train")
    data_dir_files = ("ifeval/train.jsonl", "ifeval/test.jsonl", "ifeval.jsonl", "ifeval/input_data.jsonl")

    def prepare(self, row: dict, index: int) -> dict:
        return {"doc_id": index, "native_id": row.get("key", index), **row}

    def prompt(self, doc: dict) -> str:
        return doc["prompt"]

    def label(self, doc: dict) -> dict:
        return {"instruction_id_list": doc["instruction_id_list"], "kwargs": doc["kwargs"]}

    def score(self, docs, outputs, workers=None):
        from mft.progress import progress as tqdm

        _checkers()
        pairs = tqdm(list(zip(docs, outputs)), desc=f"scoring {self.name}", unit="doc")
        return [{"metrics": check_response(doc, output), "model_answer": output} for doc, output in pairs]

    def aggregate(self, per_doc: list[dict]) -> dict[str, float]:
        """Prompt-level: mean over prompts; instruction-level: mean over all instructions of all prompts."""
        scores = {}
        for name in METRICS:
            values = [v for m in per_doc for v in (m[name] if isinstance(m[name], list) else [m[name]])]
            scores[name] = sum(values) / max(1, len(values))
        return {**scores, "primary_score": scores[self.primary_metric]}
