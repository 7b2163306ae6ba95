"""The rules both generation backends (vLLM, transformers) follow: prompts, stops and decoding.

Both: plain prompts (no chat template), no BOS (`add_special_tokens=False`), the prompt cut from the left
to `max_model_len - max_gen_toks` tokens, greedy decoding, the EOS string added to the stops, the output
cut at the first stop string. Both decode as olmes (lm-eval's vLLM model) did: special tokens kept in the
text (`skip_special_tokens=False`, no spaces inserted between them), so an added special token such as
`<|im_end|>` is a stop string like any other; and the new tokens are decoded after the prompt, as vLLM's
incremental detokenizer does, so a leading space that SentencePiece would strip at the start of a text stays.
"""

from __future__ import annotations

from dataclasses import dataclass

from mft.errors import MftError


@dataclass
class Generation:
    text: str
    num_tokens: int


# olmes' decoding (lm-eval 0.4.3 `VLLM.generate_until` passes these to vLLM's SamplingParams).
DECODE_KWARGS = {"skip_special_tokens": False, "spaces_between_special_tokens": False}
# Prompt tokens decoded ahead of the new ones (vLLM's slow detokenizer starts from the prompt's last 5).
CONTEXT_TOKENS = 5
REPLACEMENT_CHARACTER = "\ufffd"  # what a decode shows for an incomplete UTF-8 character


def decode_continuation(tokenizer, prompt_ids, new_ids) -> str:
    """The text of `new_ids` as it continues `prompt_ids`: decode(tail + new) minus decode(tail).

    `tail` is the prompt's last `CONTEXT_TOKENS` ids; both decodes use `DECODE_KWARGS`. Decoding the new ids
    alone would drop the leading space of a SentencePiece (Metaspace) first token, e.g. one of the four
    spaces of an indented `return` in HumanEval. Falls back to decoding `new_ids` alone when the tail's text
    is not a prefix of the whole (a tokenizer whose decoder rewrites earlier text). Trailing tokens whose
    text ends in an incomplete UTF-8 character (U+FFFD) are left out of the text, as vLLM leaves them.
    """
    tail = [int(i) for i in prompt_ids[max(0, len(prompt_ids) - CONTEXT_TOKENS):]]
    new = [int(i) for i in new_ids]
    prefix = tokenizer.decode(tail, **DECODE_KWARGS) if tail else ""
    # vLLM's DecodeStream holds back a text that ends in U+FFFD (an incomplete UTF-8 character) until a
    # later token completes it, and never emits it when the request ends there: the text stops after the
    # last token whose decode did not end in U+FFFD.
    end = len(new)
    while True:
        whole = tokenizer.decode(tail + new[:end], **DECODE_KWARGS)
        if end == 0 or not whole.endswith(REPLACEMENT_CHARACTER):
            break
        end -= 1
    if not tail:
        return whole
    return whole[len(prefix):] if whole.startswith(prefix) else tokenizer.decode(new[:end], **DECODE_KWARGS)


def generation_text(tokenizer, prompt_ids, tokens, stop_ids, stops: list[str]) -> str:
    """The text of a finished generation, as vLLM returns it: a last token that is one of `stop_ids` (EOS
    or an extra EOS of the generation config: `stop_token_ids`) counts in `num_tokens` but adds no text;
    the rest is decoded by `decode_continuation` and cut at the first stop string."""
    tokens = [int(t) for t in tokens]
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return cut_at_stop(decode_continuation(tokenizer, prompt_ids, tokens), stops)


def stop_list(task_stops, eos_token: str | None) -> list[str]:
    """The task's stops plus the tokenizer's EOS string, without duplicates, order kept."""
    stops = list(dict.fromkeys([*task_stops, *([eos_token] if eos_token else [])]))
    return [s for s in stops if s]


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def prompt_budget(max_model_len: int, max_gen_toks: int) -> int:
    budget = max_model_len - max_gen_toks
    if budget <= 0:
        raise MftError(f"max_model_len {max_model_len} leaves no room for a prompt with max_gen_toks "
                       f"{max_gen_toks}; raise --max-model-len or lower the task's max_gen_toks")
    return budget


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids without special tokens, each cut from the left to its last `max_prompt_tokens`.

    Raises MftError for a prompt with no tokens (vLLM refuses an empty prompt, and there is nothing to
    continue), naming its position, before any generation.
    """
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise MftError(f"prompt(s) {empty[:10]} of {len(ids)} encode to no tokens; every request needs a "
                       "non-empty prompt (vLLM refuses an empty one)")
    return [row[-max_prompt_tokens:] for row in ids]
