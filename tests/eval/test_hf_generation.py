"""The transformers backend's decode loop: incremental stop detection, finished rows leave the batch,
outputs equal to `model.generate`'s, `--batch-size auto`."""

from __future__ import annotations

import random
import re

import pytest

from mft.errors import MftError
from mft.eval.backends.decode import cut_at_stop, decode_continuation
from mft.eval.backends.hf import HFBackend, StopScanner, auto_batch_size, bytes_per_row, parse_batch_size

PROMPTS = [
    "Question: Janet has 3 apples and buys 5 more. How many apples does she have?\nAnswer:",
    "Problem:\nFind $x$ if $2x + 3 = 11$.\n\nSolution:",
    "def add(a, b):\n",
    "Question: A train travels 60 miles per hour for 3 hours. How far does it go?\nAnswer:",
    "Write a poem.",
    "Natalia sold clips to 48 of her friends",
]


def whole_text_first_hit(tokenizer, tokens, stops, prompt=()):
    """The rule the old backend applied at every step: decode the whole new text, look for a stop."""
    for n in range(1, len(tokens) + 1):
        text = decode_continuation(tokenizer, prompt, tokens[:n])
        if any(s in text for s in stops):
            return n
    return None


def scanner_first_hit(scanner, tokens, prompt=()):
    for n in range(1, len(tokens) + 1):
        if scanner.hit(tokens[:n], prompt):
            return n
    return None


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return HFBackend(str(tiny_model_dir), batch_size=4)


def sentencepiece_tokenizer():
    """A LLaMA-2-like tokenizer (Metaspace `▁`, byte fallback, leading space stripped on decode), trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    texts = ["Question: how many apples? Answer: 12 apples.\n\nQuestion: café déjà vu",
             "naïve über 東京 ok"] * 30
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_tail_stop_check_finds_the_same_first_hit_as_decoding_the_whole_text(kind, backend):
    """Random token rows (multi-byte characters cut between tokens, special tokens, byte-fallback pieces) and
    stops cut from each row's text across token boundaries: the tail check and the whole-text check stop
    at the same token in every case, including rows no stop is found in."""
    tokenizer = backend.tokenizer if kind == "byte_level" else sentencepiece_tokenizer()
    rng = random.Random(0)
    vocab = len(tokenizer)
    compared = hits = split = 0
    for _ in range(120):
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(8, 60))]
        prompt = [rng.randrange(vocab) for _ in range(6)]
        text = decode_continuation(tokenizer, prompt, tokens)
        start = rng.randrange(max(1, len(text) - 2))
        stop = text[start : start + rng.randrange(2, 12)]
        stops = [s for s in (stop, "Question:", "\n\n") if s and "\ufffd" not in s]
        expected = whole_text_first_hit(tokenizer, tokens, stops, prompt)
        got = scanner_first_hit(StopScanner(tokenizer, stops), tokens, prompt)
        assert got == expected, (tokens, stops)
        compared += 1
        hits += expected is not None
        if expected is not None and stop in stops:
            # the stop straddles a token boundary when the text one token earlier holds a proper prefix of it
            before = decode_continuation(tokenizer, prompt, tokens[: expected - 1])
            split += any(before.endswith(stop[:k]) for k in range(1, len(stop)))
    assert compared == 120 and hits >= 60 and split >= 10


def test_a_stop_split_across_tokens_ends_the_row_at_the_token_that_completes_it(backend):
    import torch

    tokenizer = backend.tokenizer
    (free,) = backend.generate([PROMPTS[0]], [], 40)
    prompt = tokenizer(PROMPTS[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():  # the tokens the backend generated (re-tokenizing its text would differ)
        tokens = backend.model.generate(prompt, do_sample=False, max_new_tokens=40)[0, prompt.shape[1]:].tolist()
    prompt_ids = prompt[0].tolist()
    assert decode_continuation(tokenizer, prompt_ids, tokens) == free.text
    pieces = [decode_continuation(tokenizer, prompt_ids + tokens[:i], [t]) for i, t in enumerate(tokens)]
    # a stop made of the last 2 characters of one token and the first 2 of the next
    k = next(i for i in range(5, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
             and "\ufffd" not in pieces[i] + pieces[i + 1])
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    (stopped,) = backend.generate([PROMPTS[0]], [stop], 40)
    assert stopped.text == free.text[: free.text.find(stop)]
    first = whole_text_first_hit(tokenizer, tokens, [stop], prompt_ids)
    assert stopped.num_tokens == first and first <= k + 2


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox", "phi3"])
def test_outputs_equal_model_generate_and_finished_rows_leave_the_batch(family, tmp_path, tokenizer):
    """Against `model.generate` of the same left-padded batch with no stop checks: every row's tokens are
    generate's first `num_tokens` tokens. The model's forward calls are counted with a hook: the rows
    computed over all steps add up to the tokens generated, so a finished row cost nothing more."""
    import torch
    from transformers import GenerationConfig

    from mft.tiny import tiny_model

    tiny_model(family, vocab_size=len(tokenizer), hidden=32, num_layers=2).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    backend = HFBackend(str(tmp_path), batch_size=len(PROMPTS))
    free = backend.generate(PROMPTS, [], 20)
    assert [g.num_tokens for g in free] == [20] * len(PROMPTS)
    # a stop that ends each row at a different step: a character of its own output
    stops = sorted({g.text[len(g.text) * (i + 1) // (len(PROMPTS) + 2)] for i, g in enumerate(free)} - {" "})
    rows_per_step = []
    hook = backend.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_per_step.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        stopped = backend.generate(PROMPTS, stops, 20)
    finally:
        hook.remove()
    lengths = [g.num_tokens for g in stopped]
    assert len(set(lengths)) >= 3 and max(lengths) <= 20
    assert sum(rows_per_step) == sum(lengths)  # one row-step per generated token, none after a row stopped
    assert rows_per_step == sorted(rows_per_step, reverse=True) and rows_per_step[0] == len(PROMPTS)

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    width = max(map(len, ids))
    input_ids = torch.tensor([[backend.pad_id] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    config = GenerationConfig(do_sample=False, max_new_tokens=20, pad_token_id=backend.pad_id,
                              eos_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        reference = backend.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    for row, generation in enumerate(stopped):
        new = reference[row, width:].tolist()
        text = decode_continuation(tokenizer, ids[row], new[: generation.num_tokens])
        assert generation.text == cut_at_stop(text, stops + ["</s>"])
        assert decode_continuation(tokenizer, ids[row], new).startswith(free[row].text)


def test_batch_size_auto_is_what_fits_in_free_memory(backend, monkeypatch):
    """bytes_per_row by hand for the tiny Llama (2 layers, 2 KV heads x 16, hidden 64, MLP 136, vocab 600,
    fp32), then auto = floor(0.7 x free / per row), capped by the prompt count and 32 on a CPU. Free memory
    is set by hand here: the real figure changes from run to run on a shared machine."""
    import mft.eval.backends.hf as hf

    config = backend.model.config
    per_row = bytes_per_row(config, 4, 100, 50)
    assert per_row == 2 * 2 * 2 * 16 * 150 * 4 + 100 * (3 * 136 + 6 * 64) * 4 + 2 * len(backend.tokenizer) * 4
    monkeypatch.setattr(hf, "free_memory_bytes", lambda device: 10 * per_row)
    assert auto_batch_size(backend.model, "cpu", 100, 50, 1000) == 7
    assert auto_batch_size(backend.model, "cpu", 100, 50, 5) == 5
    monkeypatch.setattr(hf, "free_memory_bytes", lambda device: 10**6 * per_row)
    assert auto_batch_size(backend.model, "cpu", 100, 50, 1000) == 32
    monkeypatch.setattr(hf, "free_memory_bytes", lambda device: per_row // 2)
    assert auto_batch_size(backend.model, "cpu", 100, 50, 1000) == 1

    auto = HFBackend.__new__(HFBackend)
    auto.__dict__.update(backend.__dict__, batch_size="auto")
    monkeypatch.setattr(hf, "free_memory_bytes", lambda device: 3 * per_row)
    fixed = backend.generate(PROMPTS, ["\n\n"], 12)
    assert auto.generate(PROMPTS, ["\n\n"], 12) == fixed
    assert auto.last_batch_size == auto_batch_size(backend.model, "cpu", max(
        len(backend.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS), 12, len(PROMPTS))


def test_batch_size_values():
    assert parse_batch_size(16) == 16 and parse_batch_size("8") == 8 and parse_batch_size("AUTO") == "auto"
    for bad in (0, "0", "-2", "many", "1.5"):
        with pytest.raises(MftError, match="--batch-size must be a positive integer or 'auto', got"):
            parse_batch_size(bad)


@pytest.mark.parametrize("form", ["log", "bar"])
def test_the_bar_counts_generated_tokens_only(backend, monkeypatch, capsys, form):
    """A row that stops early shrinks the bar's total by its unused budget: the bar's count (and so its
    tokens/s, count / elapsed) is the tokens generated, `sum(num_tokens)`, not `rows x max_gen_toks`.
    Both forms: the plain log line (a file) and tqdm's bar (a terminal, forced)."""
    import mft.eval.backends.hf as hf

    monkeypatch.delenv("MFT_QUIET", raising=False)
    monkeypatch.setenv("MFT_PROGRESS", form)
    free = backend.generate(PROMPTS, [], 16)
    assert [g.num_tokens for g in free] == [16] * len(PROMPTS)
    stops = sorted({g.text[len(g.text) // (i + 2)] for i, g in enumerate(free)} - {" "})
    capsys.readouterr()
    import mft.progress

    bars, original = [], mft.progress.progress

    def recording(*args, **kwargs):  # the real bar, kept to read its count and total afterwards
        bars.append(original(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(mft.progress, "progress", recording)
    stopped = backend.generate(PROMPTS, stops, 16, desc="gen")
    generated = sum(g.num_tokens for g in stopped)
    assert generated < 16 * len(PROMPTS)  # some rows stopped early: the case the bar used to overcount
    assert len(bars) == 1 and bars[0].n == generated and bars[0].total == generated
    err = capsys.readouterr().err
    if form == "log":
        last = [line for line in err.splitlines() if line.startswith("gen (batch 4): ")][-1]
        assert f" 100% {generated}/{generated} tok [" in last, last
    else:  # tqdm with unit_scale writes 17 as 17.0
        last = err.replace("\r", "\n").strip().splitlines()[-1]
        count = re.search(r"\| ([\d.]+)/([\d.]+) \[", last)
        assert count and float(count[1]) == float(count[2]) == generated, last
