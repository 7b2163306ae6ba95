"""Benchmark: the transformers backend's generation against a plain `model.generate`, and before vs after.

Builds a small Llama locally (no downloads; tokenizer trained on GSM8K text) and GSM8K 8-shot prompts as
`mft eval` builds them (the packaged test set), then, for each batch size (8 and 32 by default):

- `generate`: plain `model.generate` of the same left-padded batches, greedy, no stop checks (the ceiling);
- `ours`: `HFBackend` with no stop strings (EOS only): the same tokens, so the tokens/s ratio is exactly
  the cost of our loop, per-step stop scanning included;
- `ours+stops`: `HFBackend` with GSM8K's stops (rows leave the batch as they stop);
- `before`: the backend as it was (`model.generate` with a stopping criterion that decodes every row's
  whole text at every step), with GSM8K's stops.

Every output is checked: `ours` equals `generate` token for token (as text and count), and each stopped
output equals `generate`'s output cut at its first stop. Then end to end: the first `--gsm8k` GSM8K problems
with the task's own settings (512 new tokens, its stops), `before` (batch 8, the old default) vs `ours`
(`--batch-size auto`) vs `ours` at batch 8, in tokens/s.

    python benchmarks/generation_speed.py [--batch-sizes 8,32] [--prompts 32] [--max-gen-toks 256]
                                          [--rounds 2] [--gsm8k 64] [--threads 0]

Rounds interleave the variants; each figure is the median over rounds. Prints RESULT lines:
ours / generate tokens/s at each batch size (target >= 0.9) and exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MFT_QUIET", "1")  # no bars inside the timings


def gsm8k_prompts(n: int) -> tuple[list[str], list[str]]:
    """(the first n GSM8K 8-shot prompts as `mft eval` builds them, GSM8K's stop strings)."""
    from mft.eval.data import packaged_data_dir
    from mft.eval.specs import build_tasks

    (task,) = build_tasks(["gsm8k"], limit=n, data_dir=str(packaged_data_dir()))
    return [task.prompt(d) for d in task.load_docs()], list(task.stops)


def build_model(folder: str, hidden: int, layers: int, vocab: int) -> None:
    import json

    from mft.eval.data import packaged_data_dir
    from mft.tiny import tiny_model, train_tokenizer

    with open(packaged_data_dir() / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        texts = [(lambda r: f"Question: {r['question']}\nAnswer: {r['answer']}")(json.loads(line)) for line in f]
    tokenizer = train_tokenizer(texts, vocab_size=vocab)
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden=hidden, num_layers=layers,
                       intermediate_size=int(hidden * 8 / 3), max_position_embeddings=2048)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class Before:
    """The backend's generation before this change: `model.generate` with a StoppingCriteria that decodes
    every open row's whole new text at every step (kept here in substance, with today's decode rule)."""

    def __init__(self, backend):
        self.b = backend

    def generate(self, prompts, task_stops, max_gen_toks, batch_size):
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        from mft.eval.backends.decode import (Generation, cut_at_stop, decode_continuation, encode_prompts,
                                              prompt_budget, stop_list)
        from mft.eval.backends.hf import left_padded

        b, tok = self.b, self.b.tokenizer
        stops = stop_list(task_stops, tok.eos_token)
        ids = encode_prompts(tok, prompts, prompt_budget(b.max_model_len, max_gen_toks))
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        results = [None] * len(ids)
        eos_id = tok.eos_token_id
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            rows = [ids[i] for i in batch]
            input_ids, mask = left_padded(rows, b.pad_id, b.device)
            width = input_ids.shape[1]

            class StopOnStrings(StoppingCriteria):
                done_at: dict = {}

                def __call__(self, input_ids, scores, **kwargs):
                    new = input_ids[:, width:]
                    open_rows = [r for r in range(new.shape[0]) if r not in self.done_at]
                    texts = [decode_continuation(tok, input_ids[r, :width][mask[r, :width] == 1].tolist(), new[r])
                             for r in open_rows] if stops else []
                    for i, r in enumerate(open_rows):
                        if new[r, -1].item() == eos_id or any(s in texts[i] for s in stops):
                            self.done_at[r] = new.shape[1]
                    return torch.tensor([r in self.done_at for r in range(new.shape[0])], device=input_ids.device)

            criteria = StopOnStrings()
            criteria.done_at = {}
            config = GenerationConfig(do_sample=False, max_new_tokens=max_gen_toks, pad_token_id=b.pad_id,
                                      eos_token_id=eos_id)
            with torch.inference_mode():
                out = b.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                       stopping_criteria=StoppingCriteriaList([criteria]))
            for row, index in enumerate(batch):
                new = out[row, width:]
                n = criteria.done_at.get(row, new.shape[0])
                text = decode_continuation(tok, rows[row], new[:n].tolist())
                results[index] = Generation(cut_at_stop(text, stops), int(n))
        return results


def plain_generate(backend, prompts, max_gen_toks, batch_size):
    """`model.generate` of the same batches (longest first), greedy, EOS only: token id lists per prompt."""
    import torch
    from transformers import GenerationConfig

    from mft.eval.backends.decode import encode_prompts, prompt_budget
    from mft.eval.backends.hf import left_padded

    tok = backend.tokenizer
    ids = encode_prompts(tok, prompts, prompt_budget(backend.max_model_len, max_gen_toks))
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    results = [None] * len(ids)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_gen_toks, pad_token_id=backend.pad_id,
                              eos_token_id=tok.eos_token_id)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        rows = [ids[i] for i in batch]
        input_ids, mask = left_padded(rows, backend.pad_id, backend.device)
        width = input_ids.shape[1]
        with torch.inference_mode():
            out = backend.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        for row, index in enumerate(batch):
            new = out[row, width:].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id) + 1]
            results[index] = new
    return results


def stop_check_cost(tokenizer, stops, rows: int, length: int, seed: int = 0) -> tuple[float, float]:
    """Seconds the stop checks of `rows` rows take over `length` steps, no model involved: (the old
    whole-text check, the tail check). The rows are random tokens, so no stop ends them early."""
    import random

    from mft.eval.backends.decode import decode_continuation
    from mft.eval.backends.hf import StopScanner

    rng = random.Random(seed)
    vocab = len(tokenizer)
    data = [[rng.randrange(vocab) for _ in range(length)] for _ in range(rows)]
    prompts = [[rng.randrange(vocab) for _ in range(8)] for _ in range(rows)]
    scanner = StopScanner(tokenizer, stops)
    start = time.perf_counter()
    for n in range(1, length + 1):
        for p, r in zip(prompts, data):
            any(st in decode_continuation(tokenizer, p, r[:n]) for st in stops)
    old = time.perf_counter() - start
    start = time.perf_counter()
    for n in range(1, length + 1):
        for p, r in zip(prompts, data):
            scanner.hit(r[:n], p)
    return old, time.perf_counter() - start


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-gen-toks", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gsm8k", type=int, default=64, help="end-to-end problems (0: skip)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--min-ratio", type=float, default=0.9)
    args = parser.parse_args()

    import torch

    from mft.eval.backends.decode import cut_at_stop, decode_continuation, encode_prompts, prompt_budget, stop_list
    from mft.eval.backends.hf import HFBackend

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    prompts, stops = gsm8k_prompts(max(args.prompts, args.gsm8k))
    bench_prompts = prompts[: args.prompts]
    checks, lines = [], []
    with tempfile.TemporaryDirectory() as folder:
        build_model(folder, args.hidden, args.layers, args.vocab)
        backend = HFBackend(folder, batch_size=8)
        tok = backend.tokenizer
        lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in bench_prompts]
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"device {backend.device}; Llama {args.layers} x {args.hidden}, vocab {len(tok)}")
        print(f"{len(bench_prompts)} GSM8K 8-shot prompts, {min(lengths)}-{max(lengths)} tokens "
              f"(cut to {backend.max_model_len - args.max_gen_toks}), {args.max_gen_toks} new tokens at most")
        before = Before(backend)
        all_stops = stop_list(stops, tok.eos_token)
        backend.generate(bench_prompts[:2], [], 4)  # warm-up
        print("\n| batch | variant | tokens | seconds (median) | tokens/s | vs generate |")
        print("| --- | --- | --- | --- | --- | --- |")
        for size in sizes:
            backend.batch_size = size
            times = {k: [] for k in ("generate", "ours", "ours+stops", "before")}
            for _ in range(args.rounds):
                plain, s = timed(lambda: plain_generate(backend, bench_prompts, args.max_gen_toks, size))
                times["generate"].append(s)
                ours, s = timed(lambda: backend.generate(bench_prompts, [], args.max_gen_toks))
                times["ours"].append(s)
                stopped, s = timed(lambda: backend.generate(bench_prompts, stops, args.max_gen_toks))
                times["ours+stops"].append(s)
                old, s = timed(lambda: before.generate(bench_prompts, stops, args.max_gen_toks, size))
                times["before"].append(s)
            # the outputs
            prompt_ids = encode_prompts(tok, bench_prompts, prompt_budget(backend.max_model_len, args.max_gen_toks))
            texts = [decode_continuation(tok, q, p) for q, p in zip(prompt_ids, plain)]
            for o, p, t in zip(ours, plain, texts):
                assert (o.text, o.num_tokens) == (cut_at_stop(t, [tok.eos_token]), len(p)), "ours != generate"
            for o, t in zip(stopped, texts):
                assert o.text == cut_at_stop(t, all_stops), "ours+stops != generate cut at the stop"
            assert [(o.text, o.num_tokens) for o in old] == [(o.text, o.num_tokens) for o in stopped], "before != ours"
            counts = {"generate": sum(map(len, plain)), "ours": sum(g.num_tokens for g in ours),
                      "ours+stops": sum(g.num_tokens for g in stopped), "before": sum(g.num_tokens for g in old)}
            rate = {k: counts[k] / statistics.median(v) for k, v in times.items()}
            for k in times:
                print(f"| {size} | {k} | {counts[k]} | {statistics.median(times[k]):.2f} | {rate[k]:.0f} | "
                      f"{rate[k] / rate['generate']:.2f}x |")
            stopped_rows = sum(g.num_tokens < args.max_gen_toks for g in stopped)
            lines.append(f"batch {size}: {stopped_rows}/{len(stopped)} rows ended at a stop before "
                         f"{args.max_gen_toks} tokens; outputs: ours == generate, ours+stops == generate cut at "
                         f"the stop, before == ours+stops (all {len(plain)} prompts)")
            checks.append((f"generation tokens/s ours/generate batch {size}", rate["ours"] / rate["generate"],
                           f">= {args.min_ratio}", rate["ours"] / rate["generate"] >= args.min_ratio))
            checks.append((f"generation tokens/s ours+stops/before batch {size}", rate["ours+stops"] / rate["before"],
                           "info", True))
        print("\n" + "\n".join(lines))
        stop_only = [s for s in stops if s not in ("Question:",)] + ["Question:"]
        print("\nstop checks alone (no model; random tokens, so no row stops), per row and step:")
        print("| rows x steps | whole text each step (before) | tail only (ours) | ratio |")
        print("| --- | --- | --- | --- |")
        for length in (64, 256, 512):
            old, new = stop_check_cost(tok, stop_list(stop_only, tok.eos_token), 8, length)
            print(f"| 8 x {length} | {1e6 * old / (8 * length):.0f} us | {1e6 * new / (8 * length):.0f} us | "
                  f"{old / new:.1f}x |")

        if args.gsm8k:
            problems = prompts[: args.gsm8k]
            print(f"\nend to end: first {len(problems)} GSM8K problems, 512 new tokens at most, GSM8K's stops")
            print("| variant | batch | tokens | seconds | tokens/s |")
            print("| --- | --- | --- | --- | --- |")
            rates = {}
            backend.batch_size = "auto"
            auto, s_auto = timed(lambda: backend.generate(problems, stops, 512))
            auto_size = backend.last_batch_size
            backend.batch_size = 8
            eight, s_eight = timed(lambda: backend.generate(problems, stops, 512))
            old, s_old = timed(lambda: before.generate(problems, stops, 512, 8))
            assert [(g.text, g.num_tokens) for g in old] == [(g.text, g.num_tokens) for g in eight]
            for name, size, gens, s in (("before", 8, old, s_old), ("ours", 8, eight, s_eight),
                                        ("ours, --batch-size auto", auto_size, auto, s_auto)):
                n = sum(g.num_tokens for g in gens)
                rates[name] = n / s
                print(f"| {name} | {size} | {n} | {s:.1f} | {n / s:.0f} |")
            checks.append(("end-to-end GSM8K tokens/s ours(auto)/before", rates["ours, --batch-size auto"] /
                           rates["before"], "info", True))

    ok = True
    for name, value, target, passed in checks:
        print(f"RESULT {name} = {value:.3f} (target {target}) {'PASS' if passed else 'FAIL'}")
        ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
