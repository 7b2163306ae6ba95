"""Generation with vLLM on GPUs: every prompt of a task in one `generate` call (olmes sent them one by one)."""

from __future__ import annotations

from mft.eval.backends import MAX_MODEL_LEN, Generation, cut_at_stop, encode_prompts, prompt_budget, stop_list


class VLLMBackend:
    """Greedy decoding, tensor parallel over every visible GPU, model length 2048 as in the protocol."""

    def __init__(self, model_path: str, max_model_len: int = MAX_MODEL_LEN, tensor_parallel_size: int | None = None):
        import torch
        from vllm import LLM

        self.max_model_len = max_model_len
        self.tensor_parallel_size = tensor_parallel_size or max(1, torch.cuda.device_count())
        self.llm = LLM(model=model_path, tensor_parallel_size=self.tensor_parallel_size,
                       max_model_len=max_model_len, dtype="auto")
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[str], task_stops, max_gen_toks: int, desc: str = "generating") -> list[Generation]:
        from vllm import SamplingParams

        stops = stop_list(task_stops, self.tokenizer.eos_token)
        ids = encode_prompts(self.tokenizer, prompts, prompt_budget(self.max_model_len, max_gen_toks))
        params = SamplingParams(temperature=0.0, max_tokens=max_gen_toks, stop=stops)
        # Token ids, not text: vLLM would otherwise tokenize again and add a BOS token.
        outputs = self.llm.generate([{"prompt_token_ids": row} for row in ids], params, use_tqdm=True)
        return [Generation(cut_at_stop(out.outputs[0].text, stops), len(out.outputs[0].token_ids)) for out in outputs]
