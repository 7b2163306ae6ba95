"""Tiny models and tokenizers built locally, with no downloads: for the demo, the tests and the benchmarks.

Every family the mask layer must support is here, shaped like its real counterpart (same module names,
same fused projections) but a few hundred kilobytes in size.
"""

from __future__ import annotations

from collections.abc import Iterable

# The families the mask layer is tested on, and the module layout each one has.
FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "phi3", "olmo2", "gpt_neox")

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: str | None = None):
    """Train a byte-level BPE tokenizer on `texts` in a few seconds and wrap it for `transformers`.

    The special tokens are LLaMA-2's (`<s>`, `</s>`, `<unk>`) plus `<pad>`; the `tulu` chat template is
    attached by default, as in the published MFT runs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if chat_template is None:
        from mft.chat_templates import TULU

        chat_template = TULU
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=chat_template, **SPECIAL_TOKENS)


def tiny_config(family: str = "llama", vocab_size: int = 512, num_layers: int = 4, hidden: int = 32, **overrides):
    """A `transformers` config of `family` with `num_layers` decoder layers of width `hidden`.

    Its bos/eos/pad ids are `train_tokenizer`'s (`<s>` 0, `</s>` 1, `<pad>` 3): vLLM stops on the config's
    EOS too (it reaches generation_config.json), so a config EOS the tokenizer calls `<unk>` would end
    generations there."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_attention_heads=4, intermediate_size=2 * hidden + 8,
                  num_hidden_layers=num_layers, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                  pad_token_id=3, tie_word_embeddings=False)
    per_family = {
        "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
        "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
        "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
        "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=hidden // 4)),
        "phi3": ("Phi3Config", dict(num_key_value_heads=2)),
        "olmo2": ("Olmo2Config", dict(num_key_value_heads=2)),
        "gpt_neox": ("GPTNeoXConfig", dict()),
    }
    if family not in per_family:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {', '.join(FAMILIES)}")
    cls_name, extra = per_family[family]
    return getattr(transformers, cls_name)(**{**common, **extra, **overrides})


def tiny_model(family: str = "llama", seed: int = 0, dtype=None, **config_kwargs):
    """A randomly initialised causal LM of `family` (deterministic for a given `seed`)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_kwargs))
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def save_sentencepiece_tokenizer(texts: Iterable[str], folder, vocab_size: int = 340) -> None:
    """Train a LLaMA-2-style SentencePiece tokenizer on `texts` (BPE with byte fallback, `<unk>` `<s>` `</s>`
    at ids 0 1 2, no pad token) and save it into `folder` as LLaMA-2 ships it: `tokenizer.model` and a
    `tokenizer_config.json` naming LlamaTokenizer (transformers converts it to a fast tokenizer on loading;
    `SentencePieceBackend` reads it as the slow one). Needs the sentencepiece package."""
    import io
    import json
    import os

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as fh:
        fh.write(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": True}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=1)
