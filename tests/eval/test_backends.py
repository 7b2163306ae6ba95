"""Generation: batched == one prompt at a time, stop strings, left truncation, no BOS (vLLM: test_vllm.py)."""

from __future__ import annotations

import pytest

from mft.eval.backends.decode import cut_at_stop, encode_prompts, prompt_budget, stop_list
from mft.eval.backends.hf import HFBackend
from mft.errors import MftError

PROMPTS = [
    "Question: Janet has 3 apples and buys 5 more. How many apples does she have?\nAnswer:",
    "Problem:\nFind $x$ if $2x + 3 = 11$.\n\nSolution:",
    "def add(a, b):\n",
    "Question: A train travels 60 miles per hour for 3 hours and then 40 miles per hour for 2 more hours, "
    "stopping twice along the way. How far does it go in total?\nAnswer:",
    "Write a poem.",
]


@pytest.fixture(scope="module")
def backends(tiny_model_dir):
    return HFBackend(str(tiny_model_dir), batch_size=4), HFBackend(str(tiny_model_dir), batch_size=1)


def test_stop_helpers():
    assert stop_list(["\n\n", "</s>"], "</s>") == ["\n\n", "</s>"]
    assert stop_list([], "<|end|>") == ["<|end|>"]
    assert cut_at_stop("a\nb\n\nc Question: d", ["Question:", "\n\n"]) == "a\nb"
    assert cut_at_stop("no stop", ["\n\n"]) == "no stop"
    with pytest.raises(MftError, match="no room for a prompt"):
        prompt_budget(512, 512)


def test_prompts_have_no_bos_and_are_cut_from_the_left(backends):
    tokenizer = backends[0].tokenizer
    full = tokenizer(PROMPTS[3], add_special_tokens=False)["input_ids"]
    assert len(full) > 20
    (cut,) = encode_prompts(tokenizer, [PROMPTS[3]], 20)
    assert cut == full[-20:] and tokenizer.bos_token_id not in cut


def test_batched_generation_equals_one_prompt_at_a_time(backends):
    batched, single = backends
    a = batched.generate(PROMPTS, [], 24)
    b = single.generate(PROMPTS, [], 24)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.num_tokens for g in a] == [g.num_tokens for g in b] == [24] * len(PROMPTS)
    assert len({g.text for g in a}) > 1  # the prompts matter


def test_generation_stops_at_the_first_stop_string(backends):
    batched, single = backends
    free = batched.generate(PROMPTS, [], 24)
    # A stop taken from the middle of each unconstrained output must cut it right there, earlier.
    for index, generation in enumerate(free):
        text = generation.text
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        if not stop.strip():
            continue
        for backend in (batched, single):
            (stopped,) = backend.generate([PROMPTS[index]], [stop], 24)
            assert stopped.text == text[: text.find(stop)]
            assert stopped.num_tokens < 24
    rows = batched.generate(PROMPTS, ["\n"], 24)  # a batch where rows stop at different steps
    assert [g.text for g in rows] == [cut_at_stop(g.text, ["\n"]) for g in free]
