"""The demo's synthetic data: arithmetic drills (pre-training) and GSM8K-style word problems (fine-tuning).

Everything is generated from a seed, in memory, in well under a second; nothing is downloaded.

- **Drills** (pre-training the base model, "related but different text"): the arithmetic facts the word
  problems need — sums, differences and products of small numbers — as bare questions,
  `What is 7 + 5?` -> `7 + 5 = 12`. The base model learns to compute, not to read a story.
- **Word problems** (fine-tuning, held-out evaluation): a short story around one or two operations, answered the
  GSM8K way — reasoning lines, then `#### N`:

      Question: Mia has 7 shells. She finds 5 more shells. How many shells does Mia have now?
      Answer: 7 + 5 = 12
      #### 12

  The training and test problems share no question.

Prompt format (train == eval). Every row is a `messages` conversation; the demo tokenizer's own chat template
(`QA_TEMPLATE`, selected with `chat_template_name: tokenizer`) renders it as `Question: {user}\nAnswer:
{assistant}</s>`, exactly the 0-shot GSM8K prompt of the evaluation protocol (`Question: ...\nAnswer:`, no
BOS, stop at `\n\n` or `</s>`). So the model is trained on the very text it is prompted with at evaluation,
with the loss on the assistant tokens only, and `mft eval` scores it with the unchanged GSM8K task.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# The demo's chat template: a user turn is a GSM8K question, an assistant turn its answer. The generation
# prompt ends at "Answer:"; the answer starts with a space, so the labels start there (see mft.train.data).
QA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\\nAnswer:' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
)

NAMES = [("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Sam", "He"), ("Zoe", "She"), ("Max", "He"),
         ("Ivy", "She"), ("Ben", "He"), ("Ada", "She"), ("Tom", "He"), ("Eva", "She"), ("Jay", "He"),
         ("Lia", "She"), ("Noah", "He"), ("Ella", "She"), ("Omar", "He")]
ITEMS = ["apples", "shells", "stickers", "marbles", "cookies", "pencils", "stamps", "cards", "coins", "books",
         "beads", "eggs"]
CONTAINERS = ["bags", "boxes", "jars", "packs", "baskets", "trays"]

# Number ranges. Every fact a problem needs is in the drills: a + b for a, b <= ADD_MAX, a - b for
# a <= SUB_MAX, a * b for a, b in MUL_RANGE.
ADD_MAX = 10
SUB_MAX = 20
MUL_RANGE = range(2, 7)


def _problem(kind: str, rng: random.Random) -> tuple[str, str, int]:
    (name, pronoun), (other, _) = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    if kind == "add":
        a, b = rng.randint(1, ADD_MAX), rng.randint(1, ADD_MAX)
        q = f"{name} has {a} {item}. {pronoun} finds {b} more {item}. How many {item} does {name} have now?"
        return q, f"{a} + {b} = {a + b}", a + b
    if kind == "sub":
        a = rng.randint(4, SUB_MAX)
        b = rng.randint(1, a - 2)
        q = f"{name} has {a} {item}. {pronoun} gives {b} {item} to {other}. How many {item} does {name} have left?"
        return q, f"{a} - {b} = {a - b}", a - b
    if kind == "mul":
        a, b = rng.choice(MUL_RANGE), rng.choice(MUL_RANGE)
        box = rng.choice(CONTAINERS)
        q = f"{name} buys {a} {box} of {item}. Each of the {box} holds {b} {item}. How many {item} does {name} buy?"
        return q, f"{a} * {b} = {a * b}", a * b
    if kind == "add_sub":
        a, b = rng.randint(1, ADD_MAX), rng.randint(1, ADD_MAX)
        c = rng.randint(1, a + b - 1)
        q = (f"{name} has {a} {item}. {pronoun} finds {b} more and then gives {c} to {other}. "
             f"How many {item} does {name} have now?")
        return q, f"{a} + {b} = {a + b}\n{a + b} - {c} = {a + b - c}", a + b - c
    raise ValueError(kind)


KINDS = ("add", "sub", "mul", "add_sub")


def word_problems(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) rows {"question", "answer"}; the two sets share no question."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_test:
        q, reasoning, value = _problem(KINDS[len(rows) % len(KINDS)], rng)
        if q in seen:
            continue
        seen.add(q)
        rows.append({"question": q, "answer": f"{reasoning}\n#### {value}"})
    rng.shuffle(rows)
    return rows[:n_train], rows[n_train:]


def drills(seed: int) -> list[dict]:
    """Every arithmetic fact the problems use, as {"question", "answer"} rows, shuffled."""
    facts = [(f"{a} + {b}", a + b) for a in range(0, ADD_MAX + 1) for b in range(0, ADD_MAX + 1)]
    facts += [(f"{a} - {b}", a - b) for a in range(0, SUB_MAX + 1) for b in range(0, a + 1)]
    facts += [(f"{a} * {b}", a * b) for a in MUL_RANGE for b in MUL_RANGE]
    rows = [{"question": f"What is {expr}?", "answer": f"{expr} = {value}"} for expr, value in facts]
    random.Random(seed).shuffle(rows)
    return rows


def as_messages(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["question"]},
                         {"role": "assistant", "content": row["answer"]}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def tokenizer_texts(rows: list[dict]) -> list[str]:
    """Texts to train the BPE tokenizer on, rendered as the model will see them."""
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
