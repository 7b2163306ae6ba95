"""Training data: label layout, truncation, mixing, row checks, the tokenization cache, the collator."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from mft.chat_templates import TULU
from mft.errors import MftError
from mft.train import data as data_mod
from mft.train.config import load_config
from mft.train.data import (
    IGNORE_INDEX,
    Collator,
    build_train_dataset,
    load_mixed_messages,
    load_tokenizer,
    tokenize_messages,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "ok"},
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of a byte-level BPE vocabulary."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level BPE with no merges at all (256 bytes + 4 specials): one token per character, so every
    expected sequence below can be written out by hand."""
    from mft.tiny import train_tokenizer

    tok = train_tokenizer(["no merges"], vocab_size=260)
    assert len(tok) == 260
    return tok


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from mft.tiny import train_tokenizer

    texts = [m["content"] for m in CONVERSATION] * 50 + ["<|user|>\n<|assistant|>\n<|system|>\n"] * 50
    return train_tokenizer(texts + ["The answer is 4. Write a poem about the sea, okay?"] * 50, vocab_size=330)


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def chars(tok, text: str) -> list[int]:
    table = _bytes_to_unicode()
    return [tok.convert_tokens_to_ids(table[b]) for b in text.encode()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def conv(i: int, answer: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": answer or f"answer {i}"}], "id": i}


def make_cfg(tmp_path, *overrides):
    return load_config(None, ["--model_name_or_path=unused", f"--dataset_local_cache_dir={tmp_path / 'cache'}",
                              *overrides])


# --- the label rule ---------------------------------------------------------------------------------------
def test_labels_are_assistant_content_and_eos_only(byte_tokenizer):
    tok = byte_tokenizer
    eos = tok.eos_token_id
    out = tokenize_messages(CONVERSATION, tok, TULU, max_seq_length=1000)
    prompt1 = "<|system|>\nBe brief.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n"
    between = "\n<|user|>\nand?\n<|assistant|>\n"  # newline after EOS, next user turn, next header
    assert out["input_ids"] == (chars(tok, prompt1) + chars(tok, "4") + [eos]
                                + chars(tok, between) + chars(tok, "ok") + [eos])
    assert out["labels"] == ([IGNORE_INDEX] * len(prompt1) + chars(tok, "4") + [eos]
                             + [IGNORE_INDEX] * len(between) + chars(tok, "ok") + [eos])
    assert out["truncated"] is False


def test_add_bos_prepends_an_unlabelled_bos(byte_tokenizer):
    plain = tokenize_messages(CONVERSATION[1:3], byte_tokenizer, TULU, max_seq_length=1000)
    with_bos = tokenize_messages(CONVERSATION[1:3], byte_tokenizer, TULU, max_seq_length=1000, add_bos=True)
    assert with_bos["input_ids"] == [byte_tokenizer.bos_token_id] + plain["input_ids"]
    assert with_bos["labels"] == [IGNORE_INDEX] + plain["labels"]
    assert plain["input_ids"][0] != byte_tokenizer.bos_token_id  # the tulu template itself has no BOS


def test_truncation_cuts_ids_and_labels_together(byte_tokenizer):
    tok = byte_tokenizer
    prompt = "<|user|>\nWhat is 2+2?\n<|assistant|>\n"  # 36 characters = 36 tokens
    out = tokenize_messages([CONVERSATION[1], {"role": "assistant", "content": "four"}], tok, TULU,
                            max_seq_length=len(prompt) + 2)
    assert out["input_ids"] == chars(tok, prompt) + chars(tok, "fo")
    assert out["labels"] == [IGNORE_INDEX] * len(prompt) + chars(tok, "fo")
    assert out["truncated"] is True


def test_labels_decode_to_assistant_turns_with_a_merging_tokenizer(bpe_tokenizer):
    tok = bpe_tokenizer
    out = tokenize_messages(CONVERSATION, tok, TULU, max_seq_length=1000)
    assert len(out["input_ids"]) < 70  # merges happened
    turns, current = [], []
    for token, label in zip(out["input_ids"], out["labels"]):
        if label == IGNORE_INDEX:
            if current:
                turns.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    turns.append(current)
    assert [tok.decode(t) for t in turns] == ["4</s>", "ok</s>"]
    assert tok.decode(out["input_ids"]) == tok.apply_chat_template(CONVERSATION, chat_template=TULU, tokenize=False)


def test_a_template_that_rewrites_earlier_turns_is_refused(byte_tokenizer):
    reverse = "{% for m in messages|reverse %}{{ m['role'] + ':' + m['content'] + eos_token }}{% endfor %}"
    with pytest.raises(MftError, match="renders earlier turns differently.*use chat_template_name: tulu"):
        tokenize_messages(CONVERSATION, byte_tokenizer, reverse, max_seq_length=100)


def test_consecutive_assistant_turns_are_trained_header_included(byte_tokenizer):
    """As the original labels them: only non-assistant messages mask, so the second turn's header (and the
    newline after the first EOS) are labels."""
    tok = byte_tokenizer
    eos = tok.eos_token_id
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                {"role": "assistant", "content": "b"}]
    out = tokenize_messages(messages, tok, TULU, max_seq_length=1000)
    prompt = "<|user|>\nq\n<|assistant|>\n"
    trained = chars(tok, "a") + [eos] + chars(tok, "\n<|assistant|>\nb") + [eos]
    assert out["input_ids"] == chars(tok, prompt) + trained
    assert out["labels"] == [IGNORE_INDEX] * len(prompt) + trained


def test_other_roles_render_as_nothing_and_mask_what_they_cover(byte_tokenizer):
    tok = byte_tokenizer
    eos = tok.eos_token_id
    tool = {"role": "tool", "content": "ignored"}
    q, a1, a2 = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                 {"role": "assistant", "content": "b"})
    plain = tokenize_messages([q, a1], tok, TULU, max_seq_length=1000)
    assert tokenize_messages([q, tool, a1], tok, TULU, max_seq_length=1000) == plain
    out = tokenize_messages([q, a1, tool, a2], tok, TULU, max_seq_length=1000)
    prompt, between = "<|user|>\nq\n<|assistant|>\n", "\n<|assistant|>\n"
    assert out["input_ids"] == chars(tok, prompt) + chars(tok, "a") + [eos] + chars(tok, between) + chars(tok, "b") + [eos]
    # the tool message covers the next header: masked, unlike two assistant turns in a row
    assert out["labels"] == ([IGNORE_INDEX] * len(prompt) + chars(tok, "a") + [eos] + [IGNORE_INDEX] * len(between)
                             + chars(tok, "b") + [eos])


def test_build_counts_consecutive_assistant_turns_and_other_roles(tmp_path, byte_tokenizer, data_file_factory):
    double = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                           {"role": "assistant", "content": "b"}]}
    tool = {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "t"},
                         {"role": "assistant", "content": "c"}]}
    path = data_file_factory([conv(0), double, tool, double])
    train, stats = build_train_dataset(make_cfg(tmp_path, f"--train_file={path}"), byte_tokenizer)
    assert (len(train), stats.num_consecutive_assistant, stats.num_other_roles) == (4, 2, 1)
    assert stats.num_label_tokens == (len("answer 0") + 1) + 2 * len("a</s>\n<|assistant|>\nb</s>".replace("</s>", "E")) \
        + (1 + 1)
    assert ("2 rows with consecutive assistant turns (trained), 1 with roles other than system/user/assistant"
            in stats.summary())


# --- tokenizer ----------------------------------------------------------------------------------------------
def test_load_tokenizer_sets_template_and_pad_fallback(tmp_path, byte_tokenizer, data_file_factory):
    import copy

    tok = copy.deepcopy(byte_tokenizer)
    tok.chat_template = "{{ 'own template' }}"
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    train = data_file_factory([conv(0)])
    cfg = load_config(None, [f"--model_name_or_path={tmp_path / 'tok'}", f"--train_file={train}"])
    loaded, added = load_tokenizer(cfg)
    assert loaded.chat_template == TULU
    assert (added, loaded.pad_token, loaded.pad_token_id) == (0, "</s>", loaded.eos_token_id)
    own, _ = load_tokenizer(load_config(None, [f"--tokenizer_name={tmp_path / 'tok'}", "--model_name_or_path=x",
                                               f"--train_file={train}", "--chat_template_name=tokenizer"]))
    assert own.chat_template == "{{ 'own template' }}"


def test_tokenizer_without_template_cannot_use_its_own(tmp_path, byte_tokenizer, data_file_factory):
    import copy

    tok = copy.deepcopy(byte_tokenizer)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    cfg = load_config(None, [f"--model_name_or_path={tmp_path / 'tok'}", "--chat_template_name=tokenizer",
                             f"--train_file={data_file_factory([conv(0)])}"])
    with pytest.raises(MftError, match="asks for the tokenizer's own chat template, but it has none"):
        load_tokenizer(cfg)


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    from mft.tiny import save_sentencepiece_tokenizer

    folder = tmp_path_factory.mktemp("sp_tokenizer")
    texts = [m["content"] for m in CONVERSATION] + ["<|user|>\nhello\n<|assistant|>\nhi there", "What is 2+2?"]
    save_sentencepiece_tokenizer(texts * 30, folder, vocab_size=340)
    return folder


def test_slow_and_fast_tokenizers_label_the_same_assistant_tokens(tmp_path, sentencepiece_folder, byte_tokenizer,
                                                                  data_file_factory):
    train = data_file_factory([conv(0)])
    base = [f"--model_name_or_path={sentencepiece_folder}", f"--train_file={train}"]
    fast, _ = load_tokenizer(load_config(None, base))
    slow, added = load_tokenizer(load_config(None, base + ["--use_slow_tokenizer"]))
    assert fast.is_fast and type(slow).__name__ == "SentencePieceBackend" and not slow.is_fast
    assert (len(slow), len(fast), added, slow.pad_token, slow.eos_token_id) == (340, 340, 0, "</s>", 2)
    # one turn: the same ids and the same labels
    one = [CONVERSATION[1], CONVERSATION[2]]
    assert tokenize_messages(one, slow, TULU, 1000) == tokenize_messages(one, fast, TULU, 1000)
    # two turns: the text after EOS starts with "▁" (LLaMA's legacy SentencePiece behaviour) in both; the slow
    # one locates labels by prefix token counts, the fast one by offsets, with the same result
    text = fast.apply_chat_template(CONVERSATION, chat_template=TULU, tokenize=False)
    outs = {}
    for name, tok in (("slow", slow), ("fast", fast)):
        out = outs[name] = tokenize_messages(CONVERSATION, tok, TULU, 1000)
        assert out["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        turns, current = [], []
        for token, label in zip(out["input_ids"], out["labels"]):
            if label == IGNORE_INDEX:
                turns, current = turns + [current] if current else turns, []
            else:
                assert label == token
                current.append(token)
        assert [tok.decode(t) for t in turns + [current]] == ["4</s>", "ok</s>"]
    assert outs["slow"] == outs["fast"]
    assert slow.convert_ids_to_tokens(outs["slow"]["input_ids"])[22:25] == ["</s>", "▁", "\n<|"]
    # no SentencePiece model: the fast tokenizer stays, as the original's use_fast=False did
    byte_tokenizer.save_pretrained(tmp_path / "bytes")
    kept, _ = load_tokenizer(load_config(None, [f"--model_name_or_path={tmp_path / 'bytes'}", f"--train_file={train}",
                                                "--use_slow_tokenizer"]))
    assert kept.is_fast and len(kept) == 260


def test_add_pad_token_adds_pad_for_fft_only(sentencepiece_folder, data_file_factory):
    base = [f"--model_name_or_path={sentencepiece_folder}", f"--train_file={data_file_factory([conv(0)])}"]
    tok, added = load_tokenizer(load_config(None, base + ["--add_pad_token"]))
    assert (added, len(tok), tok.pad_token, tok.pad_token_id) == (1, 341, "<pad>", 340)
    tok, added = load_tokenizer(load_config(None, base + ["--add_pad_token", "--use_slow_tokenizer"]))
    assert (added, len(tok), tok.pad_token, tok.pad_token_id) == (1, 341, "<pad>", 340)
    # MFT and LoRA keep the embeddings frozen: padding with EOS changes nothing they compute
    tok, added = load_tokenizer(load_config(None, base + ["--add_pad_token", "--subnet_mode=both",
                                                          "--masked_layers=0"]))
    assert (added, tok.pad_token) == (0, "</s>")


@pytest.fixture()
def data_file_factory(tmp_path):
    counter = iter(range(1000))

    def make(rows, suffix=".jsonl"):
        path = tmp_path / f"data{next(counter)}{suffix}"
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), path)
            return str(path)
        return write_jsonl(path, rows)

    return make


# --- sources and the mix --------------------------------------------------------------------------------------
def original_selection(sources: list[tuple[list[dict], float]], seed: int) -> list[dict]:
    """The original's row selection, re-implemented from its description (open-instruct of January 2025,
    `get_datasets`, the data code of the published runs; the original code was not at hand when this was
    written): each source is shuffled with `datasets`' `shuffle(seed=seed)`, which permutes the rows by
    `numpy.random.default_rng(seed).permutation(len(source))`; a count N then takes the first N rows of the
    shuffled source, a fraction f the first `int(f * len(source))`; the selections are concatenated in source
    order. Written with numpy alone, not with `datasets` (the first test below pins datasets' shuffle to it)."""
    import numpy as np

    out = []
    for rows, amount in sources:
        order = np.random.default_rng(seed).permutation(len(rows))
        n = int(amount) if amount > 1 else int(amount * len(rows))
        out += [rows[i] for i in order[:n]]
    return out


def test_row_selection_reproduces_the_original(tmp_path, data_file_factory):
    import datasets

    shuffled = datasets.Dataset.from_list([{"i": i} for i in range(20)]).shuffle(seed=42)
    assert shuffled["i"] == [r["i"] for r in original_selection([([{"i": i} for i in range(20)], 1.0)], 42)]
    rows_a = [conv(i) for i in range(20)]
    rows_b = [conv(100 + i) for i in range(15)]
    a = data_file_factory(rows_a)
    b = data_file_factory(rows_b, suffix=".parquet")
    mixed, taken = load_mixed_messages(make_cfg(tmp_path, f"--dataset_mixer={{{a}: 6, {b}: 0.4}}"))
    expected = original_selection([(rows_a, 6), (rows_b, 0.4)], seed=42)
    assert taken == {a: 6, b: 6} and len(expected) == 12
    assert list(mixed["messages"]) == [r["messages"] for r in expected]  # the same rows, in the same order
    # ...which is not what the file order gives: of the first 6 of each, only a few are among them
    first = {r["id"] for r in rows_a[:6] + rows_b[:6]}
    assert len(first & {r["id"] for r in expected}) <= 4
    other_seed, _ = load_mixed_messages(make_cfg(tmp_path, f"--dataset_mixer={{{a}: 6, {b}: 0.4}}", "--seed=3"))
    assert list(other_seed["messages"]) == [r["messages"] for r in
                                            original_selection([(rows_a, 6), (rows_b, 0.4)], seed=3)]
    assert list(other_seed["messages"]) != list(mixed["messages"])


def test_mixer_list_counts_and_max_train_samples_cuts_tokenized_examples(tmp_path, data_file_factory,
                                                                         byte_tokenizer):
    a = data_file_factory([conv(i) for i in range(10)])  # ids 0..9
    b = data_file_factory([conv(100 + i) for i in range(8)], suffix=".parquet")  # ids 100..107
    mixer = f"--dataset_mixer={{{a}: 4, {b}: 0.5}}"
    mixed, taken = load_mixed_messages(make_cfg(tmp_path, mixer))
    assert taken == {a: 4, b: 4}
    assert mixed.column_names == ["messages"]
    order = [r["messages"][0]["content"] for r in mixed]
    listed, _ = load_mixed_messages(make_cfg(tmp_path, f"--dataset_mixer_list={a} 4 {b} 0.5"))
    assert [r["messages"][0]["content"] for r in listed] == order
    # max_train_samples: the first N examples with labels, after tokenizing (the original's place for it)
    no_labels = {"messages": [{"role": "user", "content": "no answer"}]}
    c = data_file_factory([no_labels, conv(200), no_labels, conv(201), conv(202)])
    full, _ = build_train_dataset(make_cfg(tmp_path, f"--train_file={c}"), byte_tokenizer)
    cut, stats = build_train_dataset(make_cfg(tmp_path, f"--train_file={c}", "--max_train_samples=2"), byte_tokenizer)
    assert (len(full), len(cut), stats.num_examples, stats.num_beyond_max_train_samples) == (3, 2, 2, 1)
    assert cut["input_ids"] == full["input_ids"][:2]
    assert stats.num_tokens == sum(map(len, full["input_ids"][:2]))
    assert "1 left out by max_train_samples" in stats.summary()


def test_count_above_the_source_size_takes_it_all(tmp_path, data_file_factory):
    a = data_file_factory([conv(i) for i in range(3)])
    mixed, taken = load_mixed_messages(make_cfg(tmp_path, f"--dataset_mixer={{{a}: 50}}"))
    assert (taken, len(mixed)) == ({a: 3}, 3)


@pytest.mark.parametrize("rows, message", [
    ([conv(0), {"prompt": "x", "id": 1}], r"data0.jsonl: row 1 \(counting from 0\) has no \"messages\" \(it has: "
                                          r"(id, prompt|prompt, id)\)"),
    ([conv(0), {"messages": [{"role": "user"}]}], r"data0.jsonl: row 1 \(counting from 0\), message 0: expected "
                                                  r"\{\"role\": str, \"content\": str\}"),
    ([{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}], r"row 0 \(counting from 0\), message 1"),
    ([{"messages": [{"role": "tool", "content": "a"}]}], r"row 0 .*message 0: role 'tool' is not one of system, "
                                                        r"user, assistant .*strict_roles: false renders it as nothing"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "assistant", "content": "c"}]}],
     r"row 0 .*message 2: an assistant turn directly after another \(strict_roles: false trains both"),
    ([{"prompt": "x"}], r"data0.jsonl has no \"messages\" column \(columns: prompt\)"),
])
def test_bad_rows_name_the_file_and_row(tmp_path, data_file_factory, rows, message):
    path = data_file_factory(rows)
    with pytest.raises(MftError, match=message):
        load_mixed_messages(make_cfg(tmp_path, f"--train_file={path}", "--strict_roles"))


def test_unreadable_and_missing_sources(tmp_path, data_file_factory):
    path = data_file_factory([conv(0)])
    cfg = make_cfg(tmp_path, f"--train_file={path}")
    Path(path).unlink()  # gone between config and data loading
    with pytest.raises(MftError, match=r"dataset file not found: .*data0.jsonl"):
        load_mixed_messages(cfg)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(MftError, match=r"broken.json: could not read: "):
        load_mixed_messages(make_cfg(tmp_path, f"--train_file={broken}"))
    with pytest.raises(MftError, match=r"org/not-here: could not load it from the Hugging Face Hub"):
        load_mixed_messages(make_cfg(tmp_path, "--dataset_name=org/not-here"))


# --- the training set and its cache -----------------------------------------------------------------------------
@pytest.fixture()
def counting_tokenizer_calls(monkeypatch):
    calls = []
    original = data_mod._tokenize_row

    def counted(row, *args, **kwargs):
        calls.append(1)
        return original(row, *args, **kwargs)

    monkeypatch.setattr(data_mod, "_tokenize_row", counted)
    return calls


def test_build_drops_unlabelled_examples_and_reports_them(tmp_path, byte_tokenizer, data_file_factory):
    long_prompt = {"messages": [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "y"}]}
    no_assistant = {"messages": [{"role": "user", "content": "only a question"}]}
    rows = [conv(0, "ab"), conv(1, "abc"), long_prompt, no_assistant]
    cfg = make_cfg(tmp_path, f"--train_file={data_file_factory(rows)}", "--max_seq_length=40")
    train, stats = build_train_dataset(cfg, byte_tokenizer)
    prompt = len("<|user|>\nquestion 0\n<|assistant|>\n")  # 33 tokens, one token per character
    assert (stats.num_raw, stats.num_examples, stats.num_dropped) == (4, 2, 2)
    assert (stats.num_dropped_truncated, stats.num_dropped_no_assistant, stats.num_truncated) == (1, 1, 1)
    assert stats.num_label_tokens == (2 + 1) + (3 + 1)  # answers plus EOS
    assert stats.num_tokens == (prompt + 3) + (prompt + 4)
    assert train.column_names == ["input_ids", "labels"] and len(train) == 2
    for ex in train:
        labelled = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]
        assert byte_tokenizer.decode(labelled) in ("ab</s>", "abc</s>")
    assert "dropped 2 without label tokens (1 truncated away, 1 without an assistant turn)" in stats.summary()
    # logged as six short records, not one line of 300+ characters with the cache path at the end
    lines = stats.summary_lines()
    assert len(lines) == 6 and all(len(lines[i]) < 120 for i in (0, 2, 3, 4)), lines  # 1 and 5 hold paths
    assert lines[1].startswith("training data sources: [") and lines[1].endswith(": 4]")
    assert lines[0].startswith("training data: 2 examples (") and lines[0].endswith("label tokens) from 4 rows")
    assert lines[-1] == f"training data tokenized into {stats.cache_dir}"


def test_second_build_loads_the_cache_without_tokenizing(tmp_path, byte_tokenizer, data_file_factory,
                                                         counting_tokenizer_calls):
    path = data_file_factory([conv(i) for i in range(6)])
    cfg = make_cfg(tmp_path, f"--train_file={path}")
    entered = []

    @contextlib.contextmanager
    def main_first():
        entered.append(1)
        yield

    first, stats1 = build_train_dataset(cfg, byte_tokenizer, main_process_first=main_first)
    assert (len(counting_tokenizer_calls), stats1.from_cache, entered) == (6, False, [1])
    assert Path(stats1.cache_dir).parent == tmp_path / "cache" / "tokenized"
    assert json.loads((Path(stats1.cache_dir) / "info.json").read_text())["rows_per_source"] == {path: 6}
    second, stats2 = build_train_dataset(cfg, byte_tokenizer, main_process_first=main_first)
    assert (len(counting_tokenizer_calls), stats2.from_cache, stats2.cache_dir) == (6, True, stats1.cache_dir)
    assert second["input_ids"] == first["input_ids"] and second["labels"] == first["labels"]
    assert (stats2.num_examples, stats2.num_tokens) == (stats1.num_examples, stats1.num_tokens)

    # anything that changes the tokens changes the key...
    _, other = build_train_dataset(make_cfg(tmp_path, f"--train_file={path}", "--max_seq_length=35"), byte_tokenizer)
    _, bos = build_train_dataset(make_cfg(tmp_path, f"--train_file={path}", "--add_bos"), byte_tokenizer)
    assert len({stats1.cache_dir, other.cache_dir, bos.cache_dir}) == 3 and len(counting_tokenizer_calls) == 18
    # ...including the data file's contents
    write_jsonl(Path(path), [conv(i, "changed") for i in range(6)])
    _, changed = build_train_dataset(cfg, byte_tokenizer)
    assert changed.cache_dir != stats1.cache_dir and not changed.from_cache
    # overwrite_cache tokenizes again into the same place
    _, redo = build_train_dataset(make_cfg(tmp_path, f"--train_file={path}", "--overwrite_cache"), byte_tokenizer)
    assert (redo.cache_dir, redo.from_cache, len(counting_tokenizer_calls)) == (changed.cache_dir, False, 30)


def test_dataset_mix_dir_holds_the_mix(tmp_path, byte_tokenizer, data_file_factory):
    path = data_file_factory([conv(i) for i in range(5)])
    cfg = make_cfg(tmp_path, f"--train_file={path}", f"--dataset_mix_dir={tmp_path / 'mix'}", "--max_train_samples=4")
    build_train_dataset(cfg, byte_tokenizer)
    lines = (tmp_path / "mix" / "train_mix.jsonl").read_text().splitlines()
    # the whole mix: max_train_samples cuts the tokenized examples later, as in the original
    assert len(lines) == 5 and all(json.loads(line)["messages"][1]["role"] == "assistant" for line in lines)


def test_nothing_left_to_train_on_is_an_error(tmp_path, byte_tokenizer, data_file_factory):
    path = data_file_factory([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(MftError, match="no training example has a label token left"):
        build_train_dataset(make_cfg(tmp_path, f"--train_file={path}"), byte_tokenizer)


# --- batches ----------------------------------------------------------------------------------------------------
def test_collator_right_pads_each_field():
    import torch

    batch = Collator(pad_token_id=3)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                      {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(MftError, match="no pad token id"):
        Collator(None)


def test_parallel_tokenization_matches_and_is_cached(tmp_path, byte_tokenizer, data_file_factory):
    path = data_file_factory([conv(i) for i in range(6)])
    single, _ = build_train_dataset(make_cfg(tmp_path, f"--train_file={path}"), byte_tokenizer)
    cfg = make_cfg(tmp_path, f"--train_file={path}", "--preprocessing_num_workers=2",
                   f"--dataset_local_cache_dir={tmp_path / 'cache2'}")
    first, stats1 = build_train_dataset(cfg, byte_tokenizer)
    second, stats2 = build_train_dataset(cfg, byte_tokenizer)
    assert (stats1.from_cache, stats2.from_cache) == (False, True)
    assert sorted(f.name for f in Path(stats2.cache_dir).iterdir()) == [
        "data_00000_of_00002.arrow", "data_00001_of_00002.arrow", "info.json"]
    assert first["input_ids"] == second["input_ids"] == single["input_ids"]
