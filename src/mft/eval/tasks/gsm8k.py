"""GSM8K, 8-shot chain of thought: the last number of the answer, compared as a string."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mft.eval import data
from mft.eval.tasks.base import Task, joined_prompt

NUMBER_RE = re.compile(r"[-+]?\d*\.\d+|\d+")  # the sign only sticks to decimals: a known protocol trap
DIGIT_COMMA_RE = re.compile(r"(\d),(\d)")
# exact_match ignores these (in this order), then case.
IGNORED_PATTERNS = [re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$")]


def extract_answer(text: str) -> str:
    """The last number in `text` (commas between digits removed); the whole text if it has none."""
    text = DIGIT_COMMA_RE.sub(r"\1\2", text)
    numbers = NUMBER_RE.findall(text)
    return numbers[-1] if numbers else text


def _clean(text: str) -> str:
    for pattern in IGNORED_PATTERNS:
        text = pattern.sub("", text)
    return text.lower()


def exact_match(prediction: str, gold: str) -> int:
    return int(_clean(prediction) == _clean(gold))


@dataclass
class GSM8K(Task):
    default_shots = 8
    default_max_gen_toks = 512
    default_fewshot = "gsm8k_8shot_cot"
    stops = ("Question:", "</s>", "<|im_end|>", "\n\n")
    primary_metric = "exact_match"
    hub = data.Source("openai/gsm8k", "main", "test")
    data_dir_files = ("gsm8k/test.jsonl", "gsm8k.jsonl")

    def prompt(self, doc: dict) -> str:
        shots = [f"Question: {ex['question']}\nAnswer: {ex['answer']}" for ex in self.exemplars()]
        return joined_prompt(shots, f"Question: {doc['question']}\nAnswer:")

    def label(self, doc: dict) -> str:
        return extract_answer(doc["answer"].split("####")[-1].strip())

    def score(self, docs, outputs, workers=None):
        from mft.progress import progress as tqdm

        results = []
        for doc, output in tqdm(list(zip(docs, outputs)), desc=f"scoring {self.name}", unit="doc"):
            answer = extract_answer(output)
            results.append({"metrics": {"exact_match": exact_match(answer, self.label(doc))}, "model_answer": answer})
        return results
