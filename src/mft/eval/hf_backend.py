"""Batched greedy generation with `transformers`: left padding, stop strings checked per row."""

from __future__ import annotations

from mft.eval.backends import (Generation, decode_continuation, encode_prompts, generation_text,
                               greedy_generation_config, hf_settings, prompt_budget, stop_list, stop_token_ids)


def make_stop_criteria(tokenizer, stops: list[str], prompt_len: int, stop_ids):
    """A StoppingCriteria for one batch: a row is done once its new text holds a stop string or its last
    token is one of `stop_ids` (`backends.stop_token_ids`).

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
                if new[row, -1].item() in stop_ids or any(s in texts[i] for s in stops):
                    self.done_at[row] = new.shape[1]
            return torch.tensor([row in self.done_at for row in range(new.shape[0])], device=input_ids.device)

    return StopOnStrings()


class HFBackend:
    """Greedy generation with a causal LM from `transformers`, `batch_size` prompts at a time."""

    def __init__(self, model_path: str, batch_size: int = 8, max_model_len: int | None = None,
                 device: str | None = None, dtype=None):
        import torch
        from transformers import AutoTokenizer

        from mft.models import load_pretrained

        settings = hf_settings(model_path, max_model_len, dtype, device)  # checked before loading
        self.device, self.max_model_len = settings["device"], settings["max_model_len"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = load_pretrained(model_path, dtype=getattr(torch, settings["dtype"]))  # image-text models too
        self.model = self.model.to(self.device).eval()
        self.stop_ids = set(stop_token_ids(model_path, self.tokenizer))
        self.batch_size = max(1, batch_size)
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
        from transformers import StoppingCriteriaList

        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        criteria = make_stop_criteria(self.tokenizer, stops, width, self.stop_ids)
        config = greedy_generation_config(max_gen_toks, self.pad_id, sorted(self.stop_ids) or None)
        self.model.generation_config = config  # nothing of the checkpoint's generation_config.json applies
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                         stopping_criteria=StoppingCriteriaList([criteria]))
        generations = []
        for row in range(len(rows)):
            new = output[row, width:]
            num_tokens = criteria.done_at.get(row, new.shape[0])
            text = generation_text(self.tokenizer, rows[row], new[:num_tokens].tolist(), self.stop_ids, stops)
            generations.append(Generation(text, int(num_tokens)))
        return generations
