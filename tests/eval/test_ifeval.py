"""IFEval: the installed checkers, offline sentence splitting, strict vs loose, the four accuracies."""

from __future__ import annotations

import json

import nltk

from mft.eval.punkt_data import ensure_punkt
from mft.eval.specs import build_tasks
from mft.eval.tasks.ifeval import check_response

from .ifeval_rows import IFEVAL_ROWS


def test_punkt_works_offline_from_packaged_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nowhere")])  # as on a fresh machine
    found = ensure_punkt()
    assert found.startswith(str(tmp_path)) and (tmp_path / "nltk_data/tokenizers/punkt_tab/english").is_dir()
    assert nltk.sent_tokenize("Mr. Smith arrived at 3 p.m. on Jan. 5. Then he left.") == [
        "Mr. Smith arrived at 3 p.m. on Jan. 5.", "Then he left."]


def test_checkers_strict_and_loose():
    no_comma = IFEVAL_ROWS[1]
    assert check_response(no_comma, "Hark we sail to Tokyo\nThen Kyoto")["prompt_level_strict_acc"] == 1
    # A comma only in the first line: strict fails, loose passes (it also tries without the first line).
    with_intro = "Sure, here it is:\nHark we sail to Tokyo\nThen Kyoto"
    assert check_response(no_comma, with_intro) == {
        "prompt_level_strict_acc": 0, "inst_level_strict_acc": [0],
        "prompt_level_loose_acc": 1, "inst_level_loose_acc": [1]}
    capitals = IFEVAL_ROWS[3]
    assert check_response(capitals, "I REGRET THE SUMMER WE LOST. THE LYRICS MEAN I MISS YOU.")["inst_level_strict_acc"] == [1]
    assert check_response(capitals, "I regret the summer we lost.")["inst_level_strict_acc"] == [0]
    email = IFEVAL_ROWS[4]
    ok = "<<Resignation>>\nDear boss I quit.\nIs there anything else I can help with?"
    assert check_response(email, ok)["inst_level_strict_acc"] == [1, 1]
    assert check_response(email, "Dear boss I quit.")["inst_level_strict_acc"] == [0, 0]


def test_task_reads_a_local_file_and_aggregates_per_instruction(tmp_path):
    path = tmp_path / "ifeval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in IFEVAL_ROWS))
    task = build_tasks([json.dumps({"task_name": "ifeval", "dataset_path": str(path)})])[0]
    docs = task.load_docs()
    assert [d["native_id"] for d in docs] == [row["key"] for row in IFEVAL_ROWS]
    assert task.prompt(docs[0]) == IFEVAL_ROWS[0]["prompt"] and task.stops == () and task.max_gen_toks == 1280
    responses = ["no commas here", "Hark we sail", "[a] [b]", "NOT ALL CAPS? yes ALL CAPS", "<<T>>\nbye"]
    scored = task.score(docs, responses)
    metrics = task.aggregate([s["metrics"] for s in scored])
    flat = [v for s in scored for v in s["metrics"]["inst_level_loose_acc"]]
    assert len(flat) == 8 and metrics["inst_level_loose_acc"] == sum(flat) / 8
    assert metrics["primary_score"] == metrics["inst_level_loose_acc"]
    assert metrics["prompt_level_strict_acc"] == sum(s["metrics"]["prompt_level_strict_acc"] for s in scored) / 5
