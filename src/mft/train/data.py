"""Training data: sources -> the mix of `messages` rows -> tokenized examples, loss on assistant tokens.

    tokenizer, num_added = load_tokenizer(cfg)        # resize the embeddings if num_added > 0
    train, stats = build_train_dataset(cfg, tokenizer, main_process_first=accelerator.local_main_process_first)
    loader = DataLoader(train, batch_size=cfg.per_device_train_batch_size, shuffle=True,
                        collate_fn=Collator(tokenizer.pad_token_id))

Sources (`TrainConfig.data_sources()`): Hugging Face dataset ids (train split), local folders, or local
`.json` / `.jsonl` / `.parquet` files; every row holds `messages`: a list of `{"role", "content"}` strings.
Row selection is the original's (open-instruct's `get_datasets`): each source is shuffled with `seed`, an
amount above 1 takes the first N rows of the shuffled source, one of at most 1 the first `int(f * rows)`;
the selections are concatenated in source order. `max_train_samples` keeps the first N tokenized examples
that have labels. The training order is the sampler's (a fresh seeded permutation per epoch).

Label rule (open-instruct's `encode_sft_example`, see `non_assistant_spans`): the conversation is rendered
with the chat template and tokenized once (no special tokens added by the tokenizer: the tulu template has no
BOS; `add_bos` prepends one). Each message that is not an assistant turn masks (-100) the text from the end of
the conversation rendered up to it to the end of the conversation rendered through it, plus the generation
header (`<|assistant|>\\n`) when an assistant turn follows; everything else is a label. With alternating turns
that leaves exactly each assistant turn's content and EOS; an assistant turn right after another is trained
with its header (and the newline before it), as the original does; a role the tulu template does not know
renders as nothing. `strict_roles: true` refuses such rows instead. Truncation to `max_seq_length` happens
last; examples left without any label are dropped and counted in `DataStats`.

Cache: the tokenized set lives in `<cache root>/tokenized/<key>/`, where the cache root is
`dataset_local_cache_dir`, else mft's cache folder (`$MFT_CACHE_DIR`, see `mft.hub.cache_dir`), and `key` hashes the mixed data's
`datasets` fingerprint (sources, amounts, seed, file contents), the tokenizer, the
template, `max_seq_length`, `add_bos` and `LABEL_RULE_VERSION`. The first process through
`main_process_first` tokenizes; the others load the result. Pass `accelerator.local_main_process_first` when
each node has its own disk, `accelerator.main_process_first` when the cache folder is shared by all nodes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field

from mft.errors import MftError
from mft.train.config import TOKENIZER_TEMPLATE, TrainConfig, source_kind

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Bump when the tokenization or label rule changes: old cache entries then stop matching.
LABEL_RULE_VERSION = 2  # 2: open-instruct's non-assistant spans (consecutive assistant turns, other roles)
TULU_ROLES = ("system", "user", "assistant")


# ------------------------------------------------------------------------------------------------------------
# Tokenizer
def load_tokenizer(cfg: TrainConfig):
    """(tokenizer, number of tokens added). The chat template is set from `chat_template_name`.

    `use_slow_tokenizer`: the SentencePiece tokenizer where the model ships one (`tokenizer.model`, LLaMA-2),
    as transformers' `SentencePieceBackend` (the slow LLaMA tokenizer's legacy behaviour: the text after a
    special token such as EOS starts with "▁"); a model without one keeps its fast tokenizer, as the original's
    `use_fast=False` did. A missing pad token: `add_pad_token` with FFT adds `<pad>` (the published runs; the
    caller grows the embeddings, see mft.train.loop), otherwise it becomes the EOS token (labels and attention
    ignore padding, and no embedding grows); a tokenizer without EOS always gets `<pad>`."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer_name or cfg.model_name_or_path
    revision = cfg.tokenizer_revision or (None if cfg.tokenizer_name else cfg.model_revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise MftError(f"cannot load the tokenizer of {name!r}: {exc}") from None
    if cfg.use_slow_tokenizer:
        tokenizer = _slow_tokenizer(name, revision, tokenizer)
    tokenizer.chat_template = chat_template(cfg, tokenizer)
    if tokenizer.eos_token is None and cfg.chat_template_name != TOKENIZER_TEMPLATE:
        raise MftError(f"the tokenizer of {name!r} has no EOS token; the {cfg.chat_template_name} template ends "
                       "every assistant turn with it")
    if cfg.add_bos and tokenizer.bos_token_id is None:
        raise MftError(f"add_bos is set but the tokenizer of {name!r} has no BOS token")
    added = 0
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None and not (cfg.add_pad_token and cfg.resolved_method == "fft"):
            tokenizer.pad_token = tokenizer.eos_token
        else:
            added = tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer, added


def _slow_tokenizer(name: str, revision, fast):
    """The SentencePiece tokenizer of `name` if it ships `tokenizer.model`, else `fast` (logged)."""
    from transformers.utils import cached_file

    try:
        vocab = cached_file(name, "tokenizer.model", revision=revision, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except OSError:
        vocab = None
    if vocab is None:
        logger.info("use_slow_tokenizer: %s has no SentencePiece model (tokenizer.model); using its fast tokenizer",
                    name)
        return fast
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        raise MftError("use_slow_tokenizer needs the sentencepiece package for the SentencePiece tokenizer of "
                       f"{name!r}: pip install sentencepiece (or set use_slow_tokenizer: false)") from None
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    special = {k: v for k, v in fast.special_tokens_map.items() if isinstance(v, str)}
    try:
        return SentencePieceBackend.from_pretrained(name, revision=revision, **special)
    except (OSError, ValueError) as exc:
        raise MftError(f"use_slow_tokenizer: cannot load the SentencePiece tokenizer of {name!r}: {exc}") from None


def chat_template(cfg: TrainConfig, tokenizer) -> str:
    """The Jinja template `chat_template_name` selects: one of mft.chat_templates or the tokenizer's own."""
    from mft.chat_templates import TEMPLATES

    if cfg.chat_template_name == TOKENIZER_TEMPLATE:
        own = tokenizer.chat_template
        if not isinstance(own, str) or not own:
            raise MftError(f"chat_template_name: {TOKENIZER_TEMPLATE} asks for the tokenizer's own chat template, "
                           f"but it has none (or several); use chat_template_name: tulu")
        return own
    return TEMPLATES[cfg.chat_template_name]


# ------------------------------------------------------------------------------------------------------------
# One example
def tokenize_messages(messages: list[dict], tokenizer, template: str, max_seq_length: int,
                      add_bos: bool = False) -> dict:
    """{"input_ids", "labels", "truncated"} for one conversation, by the label rule in the module docstring.

    Fast tokenizers locate tokens by their offset mapping; tokenizers without one (`use_slow_tokenizer`)
    by the token counts of the rendered prefixes, as the original does."""

    def render(msgs, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = render(messages)
    masked = non_assistant_spans(messages, render, text)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = list(enc["input_ids"])
        labels = list(ids)
        k = 0
        for j, (start, _) in enumerate(enc["offset_mapping"]):
            while k < len(masked) and start >= masked[k][1]:
                k += 1
            if k < len(masked) and masked[k][0] <= start:
                labels[j] = IGNORE_INDEX
    else:
        def count(prefix: str) -> int:
            return len(tokenizer(prefix, add_special_tokens=False, verbose=False)["input_ids"]) if prefix else 0

        ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        labels = list(ids)
        for start, end in masked:
            a, b = count(text[:start]), count(text[:end])
            labels[a:b] = [IGNORE_INDEX] * len(labels[a:b])
    if add_bos and not (ids and ids[0] == tokenizer.bos_token_id):
        ids.insert(0, tokenizer.bos_token_id)
        labels.insert(0, IGNORE_INDEX)
    truncated = len(ids) > max_seq_length
    return {"input_ids": ids[:max_seq_length], "labels": labels[:max_seq_length], "truncated": truncated}


def non_assistant_spans(messages: list[dict], render, text: str) -> list[tuple[int, int]]:
    """Sorted [start, end) character spans of `text` that are not trained: open-instruct's rule (January 2025
    `encode_sft_example`, the published runs). Message i that is not an assistant turn covers from the end of
    the rendered messages[:i] (0 for i = 0) to the end of messages[:i+1] rendered with the generation header
    when message i+1 is an assistant turn. Everything else is trained: assistant content and EOS, and (as in
    the original) the header of an assistant turn that follows an assistant turn or opens the conversation.

    `render(msgs, generation_prompt)` renders with the chat template. Raises MftError when a rendered prefix
    is not a prefix of `text` (the template rewrites earlier turns once later ones follow)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start = render(messages[:i]) if i else ""
        follows = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        end = render(messages[: i + 1], generation_prompt=follows)
        if not (text.startswith(start) and text.startswith(end)):
            raise MftError("the chat template renders earlier turns differently once later turns follow, so the "
                           "assistant tokens cannot be located; use chat_template_name: tulu")
        if len(end) > len(start):
            spans.append((len(start), len(end)))
    return spans


def _tokenize_row(row, tokenizer, template, max_seq_length, add_bos):
    messages = row["messages"]
    out = tokenize_messages(messages, tokenizer, template, max_seq_length, add_bos)
    out["num_label_tokens"] = sum(1 for x in out["labels"] if x != IGNORE_INDEX)
    out["consecutive_assistant"] = any(a["role"] == b["role"] == "assistant" for a, b in zip(messages, messages[1:]))
    out["other_roles"] = any(m["role"] not in TULU_ROLES for m in messages)
    return out


# ------------------------------------------------------------------------------------------------------------
# Sources and the mix
def load_mixed_messages(cfg: TrainConfig) -> tuple:
    """(datasets.Dataset with one column `messages`, {source: rows taken}): the original's row selection.

    Each source is shuffled with `cfg.seed` (`datasets.Dataset.shuffle(seed=...)`, i.e. the permutation
    `numpy.random.default_rng(seed).permutation(len(source))`), then cut to its amount: a count N takes the
    first N rows of the shuffled source, a fraction f the first `int(f * len(source))`; the selections are
    concatenated in source order, each selected row checked. This is open-instruct's `get_datasets` (January 2025, the
    data code of the published runs). The training order comes from the sampler; `max_train_samples` is applied
    later, to the tokenized examples (see build_train_dataset), as the original applies it.
    """
    import datasets

    import numpy as np

    parts, taken = [], {}
    roles = TULU_ROLES if cfg.chat_template_name != TOKENIZER_TEMPLATE else None
    for source, amount in cfg.data_sources():
        ds = _load_source(cfg, source)
        n = len(ds)
        if isinstance(amount, int):
            if amount > n:
                logger.warning("%s has %d rows, fewer than the %d asked for; using all of them", source, n, amount)
            k = min(amount, n)
        else:
            k = int(amount * n)
        if k == 0:
            raise MftError(f"{source}: amount {amount} of its {n} rows is no rows at all")
        # = ds.shuffle(seed=cfg.seed).select(range(k)): datasets draws this very permutation; kept explicit
        # so that an error can name the row's place in the file
        rows = np.random.default_rng(cfg.seed).permutation(n)[:k]
        ds = ds.select(rows)
        parts.append(_checked_messages(ds, source, roles, cfg.strict_roles, rows))
        taken[source] = taken.get(source, 0) + k
    mixed = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return mixed, taken


def _load_source(cfg: TrainConfig, source: str):
    import datasets

    kind = source_kind(source)  # raises for a missing file or an unsupported type
    try:
        if kind == "file":
            path = os.path.expanduser(source)
            builder = "parquet" if path.lower().endswith(".parquet") else "json"
            ds = datasets.load_dataset(builder, data_files=path, split="train")
        else:
            config_name = cfg.dataset_config_name if source == cfg.dataset_name else None
            ds = datasets.load_dataset(os.path.expanduser(source) if kind == "dir" else source, config_name,
                                       split="train")
    except MftError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the user needs the source and reason
        where = "read" if kind != "hub" else "load it from the Hugging Face Hub (check the name, network, HF_TOKEN)"
        raise MftError(f"{source}: could not {where}: {type(exc).__name__}: {exc}") from None
    if "messages" not in ds.column_names:
        raise MftError(f"{source} has no \"messages\" column (columns: {', '.join(ds.column_names)}); every row "
                       "needs \"messages\": [{\"role\": ..., \"content\": ...}, ...]")
    return ds


def _checked_messages(ds, source: str, roles, strict_roles: bool = False, rows=None):
    """Only the `messages` column, each message reduced to {role, content}; a bad row raises MftError naming
    its row in the file (`rows[i]`: the file row of ds's row i; None: the same)."""
    import datasets

    features = datasets.Features({"messages": [{"role": datasets.Value("string"),
                                               "content": datasets.Value("string")}]})
    return ds.map(_check_row, with_indices=True, fn_kwargs={"source": source, "roles": roles, "strict": strict_roles,
                                                           "rows": None if rows is None else rows.tolist()},
                  remove_columns=ds.column_names, features=features, desc=f"checking {source}")


def _check_row(row, idx, source, roles, strict=False, rows=None):
    messages = row.get("messages")
    where = f"{source}: row {idx if rows is None else rows[idx]} (counting from 0)"
    if messages is None:
        other = ", ".join(k for k, v in row.items() if v is not None)
        raise MftError(f"{where} has no \"messages\" (it has: {other or 'nothing'}); every row needs "
                       "\"messages\": [{\"role\": ..., \"content\": ...}, ...]")
    if not isinstance(messages, list):
        raise MftError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}}; "
                       f"got {type(messages).__name__}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise MftError(f"{where}, message {j}: expected {{\"role\": str, \"content\": str}}; got {str(m)[:200]}")
        if strict and roles is not None and m["role"] not in roles:
            raise MftError(f"{where}, message {j}: role {m['role']!r} is not one of {', '.join(roles)} "
                           "(the tulu template knows no other; strict_roles: false renders it as nothing, "
                           "as the original)")
        if strict and j and m["role"] == "assistant" and messages[j - 1].get("role") == "assistant":
            raise MftError(f"{where}, message {j}: an assistant turn directly after another (strict_roles: false "
                           "trains both, the second one's header included, as the original)")
        out.append({"role": m["role"], "content": m["content"]})
    return {"messages": out}


# ------------------------------------------------------------------------------------------------------------
# The training set
@dataclass
class DataStats:
    """What happened to the data; `summary_lines()` is logged by build_train_dataset, one record per line."""

    rows_per_source: dict = field(default_factory=dict)
    num_raw: int = 0  # rows of the mix
    num_examples: int = 0  # examples kept for training
    num_dropped_truncated: int = 0  # had assistant tokens, all cut off by max_seq_length
    num_dropped_no_assistant: int = 0  # no assistant turn at all
    num_truncated: int = 0  # examples longer than max_seq_length (kept or dropped)
    num_tokens: int = 0  # tokens of the kept examples
    num_label_tokens: int = 0  # label tokens of the kept examples
    num_beyond_max_train_samples: int = 0  # examples with labels left out by max_train_samples
    num_consecutive_assistant: int = 0  # rows with an assistant turn right after another (trained, as the original)
    num_other_roles: int = 0  # rows with a role other than system/user/assistant (tulu renders it as nothing)
    from_cache: bool = False
    cache_dir: str = ""

    @property
    def num_dropped(self) -> int:
        return self.num_dropped_truncated + self.num_dropped_no_assistant

    def summary_lines(self) -> list[str]:
        """The summary as short lines (counts; sources; drops; row quirks; the cache folder), each a log record."""
        sources = ", ".join(f"{s}: {n}" for s, n in self.rows_per_source.items())
        return [f"training data: {self.num_examples} examples ({self.num_tokens} tokens, {self.num_label_tokens} "
                f"label tokens) from {self.num_raw} rows",
                f"training data sources: [{sources}]",
                f"training data: dropped {self.num_dropped} without label tokens ({self.num_dropped_truncated} "
                f"truncated away, {self.num_dropped_no_assistant} without an assistant turn)",
                f"training data: {self.num_truncated} truncated to the maximum length; "
                f"{self.num_beyond_max_train_samples} left out by max_train_samples",
                f"training data: {self.num_consecutive_assistant} rows with consecutive assistant turns (trained), "
                f"{self.num_other_roles} with roles other than system/user/assistant",
                f"training data {'loaded from' if self.from_cache else 'tokenized into'} {self.cache_dir}"]

    def summary(self) -> str:
        """The summary lines joined with "; " (for error messages)."""
        return "; ".join(self.summary_lines())


def cache_root(cfg: TrainConfig) -> str:
    """Where tokenized data is cached: `dataset_local_cache_dir`, else mft's cache folder (`mft.hub.cache_dir`:
    `$MFT_CACHE_DIR`, `$MFT_CACHE` as an alias, `$XDG_CACHE_HOME/mft`, `~/.cache/mft`), + `tokenized`."""
    from mft.hub import cache_dir

    root = cfg.dataset_local_cache_dir or str(cache_dir())
    return os.path.join(os.path.expanduser(root), "tokenized")


def build_train_dataset(cfg: TrainConfig, tokenizer, main_process_first=contextlib.nullcontext):
    """(datasets.Dataset of {"input_ids", "labels"} int32 lists, DataStats). See the module docstring."""
    import datasets
    import numpy as np
    import pyarrow.compute as pc

    template = chat_template(cfg, tokenizer)
    with main_process_first():
        mixed, taken = load_mixed_messages(cfg)
        if cfg.dataset_mix_dir and _rank("RANK") == 0:
            os.makedirs(cfg.dataset_mix_dir, exist_ok=True)
            mixed.to_json(os.path.join(cfg.dataset_mix_dir, "train_mix.jsonl"))
        key_parts = {
            "label_rule": LABEL_RULE_VERSION,
            "data": mixed._fingerprint,
            "tokenizer": _tokenizer_digest(tokenizer),
            "special": [tokenizer.bos_token, tokenizer.eos_token],
            "template": template,
            "max_seq_length": cfg.max_seq_length,
            "add_bos": cfg.add_bos,
        }
        key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
        cache_dir = os.path.join(cache_root(cfg), key)
        info_path = os.path.join(cache_dir, "info.json")
        fresh = cfg.overwrite_cache and _rank("LOCAL_RANK") == 0
        if fresh:
            shutil.rmtree(cache_dir, ignore_errors=True)
        data_path = os.path.join(cache_dir, "data.arrow")
        num_proc = min(cfg.preprocessing_num_workers or 1, len(mixed))  # datasets caps it the same way
        # datasets reuses data.arrow whatever num_proc is, else the shards of this num_proc
        shards = _shard_paths(data_path, num_proc)
        from_cache = not fresh and (os.path.exists(data_path) or all(map(os.path.exists, shards)))
        os.makedirs(cache_dir, exist_ok=True)
        int_list = datasets.List(datasets.Value("int32")) if hasattr(datasets, "List") else \
            datasets.Sequence(datasets.Value("int32"))
        features = datasets.Features({"input_ids": int_list, "labels": int_list, "truncated": datasets.Value("bool"),
                                      "num_label_tokens": datasets.Value("int32"),
                                      "consecutive_assistant": datasets.Value("bool"),
                                      "other_roles": datasets.Value("bool")})
        tokenized = mixed.map(
            _tokenize_row,
            fn_kwargs={"tokenizer": tokenizer, "template": template, "max_seq_length": cfg.max_seq_length,
                       "add_bos": cfg.add_bos},
            remove_columns=["messages"], features=features, num_proc=num_proc if num_proc > 1 else None,
            cache_file_name=data_path, load_from_cache_file=not fresh,
            new_fingerprint=key, desc="tokenizing")
        if not from_cache:
            tmp = info_path + f".{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump({"key": key_parts, "rows_per_source": taken}, fh, indent=2)
            os.replace(tmp, info_path)

    table = tokenized.data
    n_labels = table.column("num_label_tokens").to_numpy()
    truncated = table.column("truncated").to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
    keep = n_labels > 0
    kept = np.nonzero(keep)[0]
    # max_train_samples as the original: the first N examples left after dropping those without labels
    limit = len(kept) if cfg.max_train_samples is None else min(cfg.max_train_samples, len(kept))
    beyond = kept[limit:]
    kept = kept[:limit]
    used = np.zeros(len(keep), dtype=bool)
    used[kept] = True
    stats = DataStats(
        rows_per_source=taken, num_raw=len(tokenized), num_examples=int(used.sum()),
        num_dropped_truncated=int((~keep & truncated).sum()), num_dropped_no_assistant=int((~keep & ~truncated).sum()),
        num_truncated=int(truncated.sum()), num_tokens=int(lengths[used].sum()),
        num_label_tokens=int(n_labels[used].sum()), num_beyond_max_train_samples=len(beyond),
        num_consecutive_assistant=int(table.column("consecutive_assistant").to_numpy(zero_copy_only=False).sum()),
        num_other_roles=int(table.column("other_roles").to_numpy(zero_copy_only=False).sum()),
        from_cache=from_cache, cache_dir=cache_dir)
    train = tokenized.remove_columns(["truncated", "num_label_tokens", "consecutive_assistant", "other_roles"])
    if len(kept) < len(tokenized):
        train = train.select(kept)
    if stats.num_examples == 0:
        raise MftError(f"no training example has a label token left ({stats.summary()}); check the data has "
                       "assistant turns and max_seq_length is large enough")
    for line in stats.summary_lines():
        logger.info(line)
    return train, stats


def _tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides the token ids: the fast tokenizer's serialized form, else (slow tokenizers) the
    class, the SentencePiece model or the vocabulary, and the added tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        sp = getattr(tokenizer, "sp_model", None)
        if sp is not None and hasattr(sp, "serialized_model_proto"):
            h.update(sp.serialized_model_proto())
        else:
            h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(sorted((str(k), str(v)) for k, v in tokenizer.added_tokens_decoder.items())).encode())
    return h.hexdigest()


def _shard_paths(path: str, num_proc: int | None) -> list[str]:
    """The files datasets' map writes for cache_file_name=path with num_proc workers."""
    if not num_proc or num_proc == 1:
        return [path]
    stem, ext = os.path.splitext(path)
    return [f"{stem}_{i:05d}_of_{num_proc:05d}{ext}" for i in range(num_proc)]


def _rank(var: str) -> int:
    """This process's RANK / LOCAL_RANK as set by accelerate launch / torchrun (0 when not launched)."""
    return int(os.environ.get(var, "0") or 0)


# ------------------------------------------------------------------------------------------------------------
# Batches
class Collator:
    """Right-pads a list of {"input_ids", "labels"} examples to the longest one: input_ids with pad_token_id,
    attention_mask with 0 (1 on real tokens), labels with -100. Returns int64 torch tensors."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise MftError("the tokenizer has no pad token id; load it with mft.train.data.load_tokenizer")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        longest = max(len(ex["input_ids"]) for ex in batch)
        input_ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"])
            input_ids[i, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
