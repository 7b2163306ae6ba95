"""Benchmark: batched vs one-prompt-at-a-time greedy generation with the transformers backend.

olmes runs its model one prompt at a time; `mft eval --model-type hf` batches left-padded prompts. This
builds a small Llama locally (no downloads), generates for the same GSM8K prompts both ways, checks the
outputs are identical, prints the speed-up and exits non-zero when it is below --min-ratio (3x).

    python benchmarks/eval_batching.py [--prompts 32] [--batch-size 16] [--max-gen-toks 64] [--rounds 3]
                                       [--threads 1]

The two ways alternate for --rounds rounds and the fastest round of each counts: a shared machine's
background load then slows both alike instead of skewing the ratio. torch runs on one thread by default:
on a small shared machine two threads keep waiting for each other and the timings swing several-fold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from mft.eval.data import packaged_data_dir

GSM8K = packaged_data_dir() / "gsm8k" / "test.jsonl"  # shipped in the package (licence in its PROVENANCE.md)


def load_questions(n: int) -> list[str]:
    """The first max(n, 300) GSM8K test problems as "question\\nanswer" texts (the tokenizer trains on them).

    Raises FileNotFoundError when the packaged file is missing (a broken install): never made-up prompts.
    """
    if not GSM8K.is_file():
        raise FileNotFoundError(f"the packaged GSM8K test set is missing at {GSM8K}: reinstall mft (pip install -e .)")
    with open(GSM8K, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][: max(n, 300)]
    return [f"{r['question']}\n{r['answer']}" for r in rows]


def build_model(folder: str, texts: list[str]) -> None:
    from mft.tiny import tiny_model, train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=1024)
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden=256, num_layers=4)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def timed_generate(backend, prompts, max_gen_toks):
    started = time.perf_counter()
    generations = backend.generate(prompts, ["Question:"], max_gen_toks, desc=f"batch {backend.batch_size}")
    return generations, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-gen-toks", type=int, default=64)
    parser.add_argument("--min-ratio", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    from mft.eval.backends.hf import HFBackend

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = load_questions(args.prompts)
    prompts = ["Question: " + t.split("\n")[0] + "\nAnswer:" for t in texts[: args.prompts]]
    with tempfile.TemporaryDirectory() as folder:
        build_model(folder, texts)
        batched = HFBackend(folder, batch_size=args.batch_size)
        single = HFBackend(folder, batch_size=1)
        timed_generate(batched, prompts[:2], 4)  # warm-up
        fast_s = slow_s = float("inf")
        for _ in range(args.rounds):
            fast, seconds = timed_generate(batched, prompts, args.max_gen_toks)
            fast_s = min(fast_s, seconds)
            slow, seconds = timed_generate(single, prompts, args.max_gen_toks)
            slow_s = min(slow_s, seconds)
    same = [(a.text, a.num_tokens) == (b.text, b.num_tokens) for a, b in zip(fast, slow)]
    ratio = slow_s / fast_s
    tokens = sum(g.num_tokens for g in fast)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{len(prompts)} GSM8K prompts, {tokens} generated tokens, Llama 4x256")
    print(f"fastest of {args.rounds} rounds: one at a time: {slow_s:.2f} s   batch {args.batch_size}: {fast_s:.2f} s   speed-up: {ratio:.2f}x")
    print(f"identical outputs: {sum(same)}/{len(same)}")
    if not all(same):
        print("FAIL: batched outputs differ from one-at-a-time outputs", file=sys.stderr)
        return 1
    if ratio < args.min_ratio:
        print(f"FAIL: speed-up {ratio:.2f}x is below {args.min_ratio}x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
