"""GSM8K: prompt layout, answer extraction and exact_match, on the real test set."""

from __future__ import annotations

from mft.eval.specs import build_tasks
from mft.eval.tasks.gsm8k import exact_match, extract_answer

from .conftest import read_jsonl


def test_extraction_follows_the_protocol_including_its_traps():
    assert extract_answer("so 1,234 apples and 5 pears... 12,000") == "12000"
    assert extract_answer("It costs $3.50 each, so -2.25 left") == "-2.25"
    assert extract_answer("the answer is -7") == "7"  # the sign of integers is lost (both sides)
    assert extract_answer("no number here") == "no number here"
    assert exact_match("18.", "18") == 1 and exact_match("$18", "18") == 1 and exact_match("#### 18", "18") == 1
    assert exact_match("19", "18") == 0


def test_prompt_is_eight_exemplars_then_the_question(shared_data):
    task = build_tasks(["gsm8k"], limit=1, data_dir=str(shared_data))[0]
    doc = task.load_docs()[0]
    prompt = task.prompt(doc)
    assert prompt.startswith("Question: There are 15 trees in the grove.")
    assert prompt.count("Question: ") == 9 and prompt.count("\nAnswer: ") == 8
    assert prompt.endswith("\n\nQuestion: " + doc["question"] + "\nAnswer:")
    assert task.max_gen_toks == 512 and task.stops == ("Question:", "</s>", "<|im_end|>", "\n\n")
    zero = build_tasks(['{"task_name": "gsm8k", "num_shots": 0}'], limit=1, data_dir=str(shared_data))[0]
    assert zero.prompt(doc) == "Question: " + doc["question"] + "\nAnswer:"


def test_every_gold_answer_of_the_test_set_scores_correct(shared_data):
    task = build_tasks(["gsm8k"], data_dir=str(shared_data))[0]
    docs = task.load_docs()
    assert len(docs) == 1319 == len(read_jsonl(shared_data / "gsm8k" / "test.jsonl"))
    scored = task.score(docs, [doc["answer"] for doc in docs])
    assert sum(s["metrics"]["exact_match"] for s in scored) == 1319
    assert task.aggregate([s["metrics"] for s in scored]) == {"exact_match": 1.0, "primary_score": 1.0}


def test_recorded_task_config_names_the_data_file_by_the_spec_key(tmp_path):
    """task_config records the data file as `dataset_path`, the key a --task spec takes (it was `dataset`)."""
    import json

    from mft.eval.specs import parse_spec

    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "What is 1 plus 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    spec = {"task_name": "gsm8k", "num_shots": 0, "dataset_path": str(data)}
    config = build_tasks([json.dumps(spec)])[0].config()
    assert "dataset" not in config and config["dataset_path"] == str(data)
    again = {key: config[key] for key in ("task_name", "num_shots", "dataset_path")}
    assert parse_spec(json.dumps(again)) == spec  # given back as a spec, it is accepted
