"""Batched greedy generation with `transformers`: left padding, stop strings checked per row."""

from __future__ import annotations

from mft.eval.backends import (MAX_MODEL_LEN, Generation, cut_at_stop, decode_continuation, encode_prompts,
                               prompt_budget, stop_list)


def make_stop_criteria(tokenizer, stops: list[str], prompt_len: int, eos_id: int | None):
    """A StoppingCriteria for one batch: a row is done once its new text holds a stop string or EOS.

    `done_at[row]` is the number of new tokens the row had when it finished, which is its `num_tokens`.
    The whole new text is decoded (not a tail) by the same rule as the final text (`decode_continuation`,
    special tokens kept), so the check agrees with the final cut at the stop.
    """
    import torch
    from transformers import StoppingCriteria

    class StopOnStrings(StoppingCriteria):
        def __init__(self):
            self.done_at: dict[int, int] = {}

        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids[:, prompt_len:]
            open_rows = [row for row in range(new.shape[0]) if row not in self.done_at]
            texts = [decode_continuation(tokenizer, input_ids[row, :prompt_len], new[row]) for row in open_rows] \
                if stops else []
            for i, row in enumerate(open_rows):
                if (eos_id is not None and new[row, -1].item() == eos_id) or any(s in texts[i] for s in stops):
                    self.done_at[row] = new.shape[1]
            return torch.tensor([row in self.done_at for row in range(new.shape[0])], device=input_ids.device)

    return StopOnStrings()


class HFBackend:
    """Greedy generation with a causal LM from `transformers`, `batch_size` prompts at a time."""

    def __init__(self, model_path: str, batch_size: int = 8, max_model_len: int = MAX_MODEL_LEN,
                 device: str | None = None, dtype=None):
        import torch
        from transformers import AutoTokenizer

        from mft.models import load_pretrained

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if self.device == "cuda" else torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = load_pretrained(model_path, dtype=dtype).to(self.device).eval()  # image-text models too
        self.batch_size = max(1, batch_size)
        self.max_model_len = max_model_len
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0

    def generate(self, prompts: list[str], task_stops, max_gen_toks: int, desc: str = "generating") -> list[Generation]:
        """One Generation per prompt, in the order given; prompts are batched longest first."""
        from tqdm.auto import tqdm

        stops = stop_list(task_stops, self.tokenizer.eos_token)
        ids = encode_prompts(self.tokenizer, prompts, prompt_budget(self.max_model_len, max_gen_toks))
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: out-of-memory shows early
        results: list[Generation | None] = [None] * len(ids)
        with tqdm(total=len(ids), desc=desc, unit="prompt") as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                for index, generation in zip(batch, self._generate_batch([ids[i] for i in batch], stops, max_gen_toks)):
                    results[index] = generation
                bar.update(len(batch))
        return results  # type: ignore[return-value]

    def _generate_batch(self, rows: list[list[int]], stops: list[str], max_gen_toks: int) -> list[Generation]:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        eos_id = self.tokenizer.eos_token_id
        criteria = make_stop_criteria(self.tokenizer, stops, width, eos_id)
        config = GenerationConfig(do_sample=False, max_new_tokens=max_gen_toks, pad_token_id=self.pad_id,
                                  eos_token_id=eos_id)
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                         stopping_criteria=StoppingCriteriaList([criteria]))
        generations = []
        for row in range(len(rows)):
            new = output[row, width:]
            num_tokens = criteria.done_at.get(row, new.shape[0])
            text = decode_continuation(self.tokenizer, rows[row], new[:num_tokens].tolist())
            generations.append(Generation(cut_at_stop(text, stops), int(num_tokens)))
        return generations
