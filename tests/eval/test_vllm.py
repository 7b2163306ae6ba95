"""The vLLM backend against a strict stand-in for vLLM (tests/eval/vllm_standin.py: vLLM needs CUDA, this
machine has none, so `vllm` is the only thing replaced), and the decode rule the two backends share."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest
import torch

from mft.errors import MftError
from mft.eval.backends.decode import decode_continuation, encode_prompts
from mft.eval.backends.hf import HFBackend
from mft.eval.backends.vllm import VLLM_MIN_VERSION, choose_dtype, choose_tensor_parallel_size, divided_sizes

from . import vllm_standin
from .conftest import read_jsonl

_find_spec = importlib.util.find_spec
GSM8K_STOPS = ["Question:", "</s>", "<|im_end|>", "\n\n"]  # EVAL_SPEC's gsm8k stops


@pytest.fixture(scope="module")
def chatml_model_dir(tmp_path_factory, shared_data):
    """A tiny Llama with a byte-level tokenizer plus ChatML's added special tokens, whose greedy output
    reaches `<|im_end|>`: the token's output row is a copy of a token the model picks early, scaled up
    (a model trained on chats ends its turns that way)."""
    from mft.tiny import tiny_model, train_tokenizer

    texts = [r["question"] + "\n" + r["answer"] for r in read_jsonl(shared_data / "gsm8k" / "test.jsonl")[:200]]
    tokenizer = train_tokenizer(texts, vocab_size=500)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden=64, num_layers=2)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = torch.tensor([tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]])
    free = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, prompt.shape[1]:]
    with torch.no_grad():
        model.lm_head.weight[im_end] = model.lm_head.weight[free[6]] * 3
    path = tmp_path_factory.mktemp("tiny_chatml")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PROMPTS = [
    "Question: Janet has 3 apples and buys 5 more. How many apples does she have?\nAnswer:",
    "Question: A train travels 60 miles per hour for 3 hours. How far does it go?\nAnswer:",
    "Problem:\nFind $x$ if $2x + 3 = 11$.\n\nSolution:",
]


def test_recorded_fields_match_the_installed_vllm():
    """Only where vLLM is installed (a GPU machine): the stand-in's field list is the real class's."""
    vllm = pytest.importorskip("vllm")
    real = {f for f in vllm.SamplingParams.__struct_fields__ if not f.startswith("_")}
    assert set(vllm_standin.SAMPLING_PARAMS_FIELDS) <= real, vllm.__version__


def test_standin_is_strict():
    with pytest.raises(TypeError, match=r"\['max_new_tokens'\]"):
        vllm_standin.SamplingParams(temperature=0.0, max_new_tokens=5)
    with pytest.raises(TypeError, match="skip_special_tokens must be a bool"):
        vllm_standin.SamplingParams(skip_special_tokens="no")
    assert vllm_standin.check_stop_strings("ab\n\nQuestion:", 10, ["Question:", "\n\n"]) == ("\n\n", 2)


def test_both_backends_stop_at_an_added_special_token(monkeypatch, chatml_model_dir):
    """olmes keeps special tokens in the text, so `<|im_end|>` is a stop; with vLLM's defaults
    (skip_special_tokens=True) it vanishes from the text and generation runs on to max_tokens."""
    vllm_standin.install(monkeypatch, gpus=1)
    from mft.eval.backends.vllm import VLLMBackend

    vllm = VLLMBackend(str(chatml_model_dir))
    hf = HFBackend(str(chatml_model_dir), batch_size=2)
    a = vllm.generate(PROMPTS, GSM8K_STOPS, 24)
    b = hf.generate(PROMPTS, GSM8K_STOPS, 24)
    assert [(g.text, g.num_tokens) for g in a] == [(g.text, g.num_tokens) for g in b]
    assert a[0].num_tokens == 7  # 6 tokens of text, then <|im_end|> (kept in token_ids, cut from the text)
    (call,) = vllm.llm.calls
    params = call["params"].given
    assert params == {"temperature": 0.0, "max_tokens": 24, "stop": GSM8K_STOPS, "skip_special_tokens": False,
                      "spaces_between_special_tokens": False}
    assert call["use_tqdm"] is True and all(set(p) == {"prompt_token_ids"} for p in call["prompts"])
    (out,) = vllm.llm.generate([call["prompts"][0]], vllm_standin.SamplingParams(temperature=0.0, max_tokens=24,
                                                                                   stop=GSM8K_STOPS))
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 24
    assert out.outputs[0].text.startswith(a[0].text) and "<|im_end|>" not in out.outputs[0].text
    (olmes,) = vllm.llm.generate([call["prompts"][0]], vllm.sampling_params(GSM8K_STOPS, 24))
    assert olmes.outputs[0].stop_reason == "<|im_end|>" and olmes.outputs[0].token_ids[-1] == \
        vllm.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_eos_is_kept_in_token_ids_and_cut_from_the_text(chatml_model_dir):
    """The detokenizer rule on a scripted output: EOS ends the request, counts as a token, adds no text."""
    tokenizer = HFBackend(str(chatml_model_dir)).tokenizer
    prompt = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    words = tokenizer(" 12 apples", add_special_tokens=False)["input_ids"]
    params = vllm_standin.SamplingParams(temperature=0.0, max_tokens=50, stop=["</s>"], skip_special_tokens=False,
                                         spaces_between_special_tokens=False)
    text, kept, finish, _ = vllm_standin.detokenize(tokenizer, prompt, words + [tokenizer.eos_token_id, 7], params,
                                                    tokenizer.eos_token_id)
    assert (text, kept, finish) == (" 12 apples", words + [tokenizer.eos_token_id], "stop")
    assert decode_continuation(tokenizer, prompt, words + [tokenizer.eos_token_id]) == " 12 apples</s>"
    chat = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|im_start|>"])
    scripted = words + chat + words
    standin = vllm_standin.detokenize(tokenizer, prompt, scripted, params, tokenizer.eos_token_id)[0]
    assert standin == decode_continuation(tokenizer, prompt, scripted) == \
        " 12 apples<|im_start|><|im_end|><|im_start|> 12 apples"


def test_decode_keeps_the_leading_space_sentencepiece_strips():
    """A Metaspace (LLaMA-2 style) tokenizer: decoding HumanEval's completion alone loses one of the four
    spaces of `    return`; decoded after the prompt, as vLLM does, it keeps all four."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 20,
                            trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "</s>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    prompt = "def add(a, b):\n"
    whole = tokenizer(prompt + "    return a + b", add_special_tokens=False)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert whole[: len(head)] == head
    new = whole[len(head):]
    assert tokenizer.decode(new) == "   return a + b"  # three spaces: the failure this rule prevents
    assert decode_continuation(tokenizer, head, new) == "    return a + b"
    params = vllm_standin.SamplingParams(max_tokens=50, skip_special_tokens=False, spaces_between_special_tokens=False)
    assert vllm_standin.detokenize(tokenizer, head, new, params, None)[0] == "    return a + b"


def test_empty_prompts_are_refused_before_generation(monkeypatch, chatml_model_dir):
    vllm_standin.install(monkeypatch, gpus=1)
    from mft.eval.backends.vllm import VLLMBackend

    vllm = VLLMBackend(str(chatml_model_dir))
    with pytest.raises(MftError, match=r"prompt\(s\) \[1\] of 3 encode to no tokens"):
        vllm.generate([PROMPTS[0], "", PROMPTS[1]], GSM8K_STOPS, 8)
    assert vllm.llm.calls == []
    with pytest.raises(ValueError, match="The decoder prompt cannot be empty"):  # what vLLM would have said
        vllm.llm.generate([{"prompt_token_ids": []}], vllm.sampling_params([], 8))
    with pytest.raises(MftError, match=r"\[0\] of 1"):
        HFBackend(str(chatml_model_dir)).generate([""], [], 8)


def test_over_length_prompts_are_cut_from_the_left(monkeypatch, chatml_model_dir):
    """max_model_len 64, 16 new tokens: a 200-token prompt goes to vLLM as its last 48 tokens, which vLLM
    accepts (it refuses 64), and both backends continue it the same way."""
    vllm_standin.install(monkeypatch, gpus=1)
    from mft.eval.backends.vllm import VLLMBackend

    vllm = VLLMBackend(str(chatml_model_dir), max_model_len=64)
    long_prompt = " ".join(PROMPTS * 8)
    full = vllm.tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    assert len(full) > 150
    a = vllm.generate([long_prompt, PROMPTS[1]], [], 16)
    (call,) = vllm.llm.calls
    assert [p["prompt_token_ids"] for p in call["prompts"]] == [full[-48:], encode_prompts(vllm.tokenizer,
                                                                                            [PROMPTS[1]], 48)[0]]
    assert vllm.llm.init["max_model_len"] == 64
    b = HFBackend(str(chatml_model_dir), max_model_len=64).generate([long_prompt, PROMPTS[1]], [], 16)
    assert [(g.text, g.num_tokens) for g in a] == [(g.text, g.num_tokens) for g in b]
    with pytest.raises(ValueError, match="longer than the maximum model length of 64"):
        vllm.llm.generate([{"prompt_token_ids": full[-64:]}], vllm.sampling_params([], 16))


@pytest.mark.parametrize("gpus, heads, kv_heads, intermediate, expected", [
    (1, 32, 32, 11008, 1), (2, 32, 32, 11008, 2), (3, 32, 32, 11008, 2), (5, 32, 32, 11008, 4),
    (6, 32, 32, 11008, 4), (7, 32, 32, 11008, 4), (8, 32, 32, 11008, 8), (8, 32, 8, 14336, 8),
    (7, 28, 4, 18944, 4),  # Qwen2.5-7B: 28 heads, 4 KV heads; 7 divides 28 but not the KV heads
    (6, 40, 40, 13824, 4),  # LLaMA-2-13B on 6 GPUs: 5 divides the 40 heads, not intermediate_size 13824
    (6, 40, 40, 13820, 5),  # the same heads with an MLP width 5 divides
])
def test_default_tensor_parallel_size(gpus, heads, kv_heads, intermediate, expected):
    assert choose_tensor_parallel_size(None, heads, kv_heads, gpus, {"intermediate_size": intermediate}) == expected


def test_tensor_parallel_rule_reads_every_width_vllm_splits():
    """LLaMA-2-13B's config: 5 GPUs would split its heads but not its MLP (vLLM asserts in
    MergedColumnParallelLinear); a Qwen2-MoE config adds the experts' and the shared expert's widths."""
    from transformers import LlamaConfig, Qwen2MoeConfig

    llama13 = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40)
    assert divided_sizes(llama13) == {"intermediate_size": 13824}
    with pytest.raises(MftError, match=r"--tensor-parallel-size 5 does not divide the model's intermediate_size "
                                       r"13824; sizes that fit 6 GPU\(s\): \[1, 2, 4\]"):
        choose_tensor_parallel_size(5, 40, 40, 6, divided_sizes(llama13))
    moe = Qwen2MoeConfig(intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632)
    assert divided_sizes(moe) == {"intermediate_size": 5632, "moe_intermediate_size": 1408,
                                  "shared_expert_intermediate_size": 5632}
    assert choose_tensor_parallel_size(None, 16, 16, 8, {"moe_intermediate_size": 1412}) == 4  # 1412 = 4 * 353


def test_tensor_parallel_size_errors():
    with pytest.raises(MftError, match=r"--tensor-parallel-size 3 does not divide the model's 32 attention heads, "
                                       r"32 key/value heads .*sizes that fit 4 GPU\(s\): \[1, 2, 4\]"):
        choose_tensor_parallel_size(3, 32, 32, 4)
    with pytest.raises(MftError, match="--tensor-parallel-size 8 needs 8 GPUs; 4 visible"):
        choose_tensor_parallel_size(8, 32, 32, 4)
    with pytest.raises(MftError, match="needs a CUDA GPU and none is visible"):
        choose_tensor_parallel_size(None, 32, 32, 0)


def test_dtype_rule():
    """vLLM's own auto rule (_resolve_auto_dtype) for the GPU: an A100/H100 (8.0/9.0) has bfloat16, a V100
    (7.0) or T4 (7.5) does not, so a float32 or bfloat16 checkpoint runs in float16 there."""
    assert choose_dtype(None, "float32", (9, 0)) == "bfloat16"
    assert choose_dtype("auto", "float16", (8, 0)) == "float16"
    assert choose_dtype("auto", "bfloat16", (9, 0)) == "bfloat16"
    assert choose_dtype("float32", "float32", (9, 0)) == "float32"
    assert choose_dtype("auto", "float32", (7, 0)) == "float16"
    assert choose_dtype("auto", "bfloat16", (7, 5)) == "float16"
    assert choose_dtype("auto", "float32", (7, 0), "gemma2") == "float32"  # vLLM refuses gemma2 in float16
    with pytest.raises(MftError, match="--dtype bfloat16 needs a GPU of compute capability 8.0 or newer; this "
                                       "one has 7.0: use --dtype float16"):
        choose_dtype("bfloat16", "bfloat16", (7, 0))


def test_multi_gpu_settings_reach_vllm_and_are_logged(monkeypatch, capsys, chatml_model_dir, tmp_path):
    """The tiny model has 4 heads: 3 visible GPUs -> 2; a float32 checkpoint -> bfloat16; float16 kept."""
    vllm_standin.install(monkeypatch, gpus=3)
    from mft.eval.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(chatml_model_dir), gpu_memory_utilization=0.7)
    assert backend.llm.init == {"model": str(chatml_model_dir), "tensor_parallel_size": 2, "max_model_len": 512,
                                "dtype": "bfloat16", "gpu_memory_utilization": 0.7}
    log = capsys.readouterr().err
    assert "tensor_parallel_size 2 (largest that fits: 3 GPU(s) visible, 4 heads" in log
    assert "dtype bfloat16 (auto; checkpoint: float32 from its config; compute capability 9.0)" in log
    half = tmp_path / "half"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(chatml_model_dir, dtype=torch.float16).save_pretrained(half)
    AutoTokenizer.from_pretrained(chatml_model_dir).save_pretrained(half)
    assert VLLMBackend(str(half), tensor_parallel_size=1).llm.init["dtype"] == "float16"
    assert VLLMBackend(str(half), dtype="float32").llm.init["dtype"] == "float32"
    with pytest.raises(MftError, match="--tensor-parallel-size 3 does not divide the model's 4 attention heads"):
        VLLMBackend(str(half), tensor_parallel_size=3)


def test_old_vllm_is_refused_before_loading(monkeypatch, chatml_model_dir):
    vllm_standin.install(monkeypatch, version="0.10.1", gpus=1)
    from mft.eval.backends.vllm import VLLMBackend

    with pytest.raises(MftError, match=f"vLLM 0.10.1 is older than the supported {VLLM_MIN_VERSION}"):
        VLLMBackend(str(chatml_model_dir))
    assert vllm_standin.LLM.instances == []


def test_mft_eval_vllm_matches_hf(monkeypatch, chatml_model_dir, shared_data, tmp_path):
    """`mft eval --model-type vllm` end to end on the stand-in: the same predictions as the hf backend."""
    from mft.cli import main

    vllm_standin.install(monkeypatch, gpus=2)
    task = json.dumps({"task_name": "gsm8k", "num_shots": 2, "generation_kwargs": {"max_gen_toks": 12}})
    rows = {}
    for model_type in ("vllm", "hf"):
        out = tmp_path / model_type
        extra = ["--tensor-parallel-size", "2", "--dtype", "bfloat16"] if model_type == "vllm" else []
        assert main(["eval", "--model", str(chatml_model_dir), "--task", task, "--model-type", model_type,
                     "--limit", "3", "--data-dir", str(shared_data), "--output-dir", str(out), *extra]) == 0
        (predictions,) = out.glob("task-000-gsm8k-predictions.jsonl")
        rows[model_type] = [r["model_output"] for r in read_jsonl(predictions)]
    assert rows["vllm"] == rows["hf"] and len(rows["hf"]) == 3
    assert vllm_standin.LLM.instances[0].init["tensor_parallel_size"] == 2
    config = json.loads((tmp_path / "vllm" / "metrics.json").read_text())["model_config"]
    assert (config["model_type"], config["dtype"], config["tensor_parallel_size"]) == ("vllm", "bfloat16", 2)
    assert config["decode"] == {"skip_special_tokens": False, "spaces_between_special_tokens": False}


@pytest.mark.parametrize("flags, message", [
    (["--model-type", "hf", "--tensor-parallel-size", "2"], "--tensor-parallel-size only apply to the vllm backend"),
    (["--model-type", "vllm", "--gpu-memory-utilization", "1.5"], r"in \(0, 1\]; got 1.5"),
    (["--model-type", "vllm", "--tensor-parallel-size", "0"], "must be a positive number of GPUs, got 0"),
])
def test_bad_vllm_flags_are_refused_before_loading(monkeypatch, capsys, chatml_model_dir, tmp_path, flags, message):
    import re

    from mft.cli import main

    vllm_standin.install(monkeypatch, gpus=2)
    assert main(["eval", "--model", str(chatml_model_dir), "--task", "gsm8k", "--data-dir", "packaged",
                 "--output-dir", str(tmp_path / "out"), *flags]) == 1
    assert re.search("mft eval: error: .*" + message, capsys.readouterr().err)
    assert vllm_standin.LLM.instances == [] and not (tmp_path / "out").exists()


def test_cuda_pairing_messages():
    from mft.eval.backends.vllm import cuda_problem

    assert cuda_problem((12, 8), "12.8", 4) is None
    fatal, message = cuda_problem((11, 8), "12.8", 4)
    assert fatal and "supports CUDA up to 11.8, but torch was built for CUDA 12.8" in message
    fatal, message = cuda_problem((12, 2), "12.8", 1)
    assert not fatal and "minor-version compatibility" in message
    assert cuda_problem(None, "12.8", 0) == (True, cuda_problem(None, "13.0", 2)[1])
    assert "no NVIDIA driver found" in cuda_problem(None, "12.8", 0)[1]
    assert "CPU-only build" in cuda_problem((12, 8), None, 0)[1]
    assert "no GPU is visible" in cuda_problem((13, 0), "12.8", 0)[1]


def test_the_floor_is_the_one_pip_installs():
    """pyproject's [vllm] extra and the run-time check name the same oldest vLLM."""
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'vllm = ["vllm>={VLLM_MIN_VERSION}", "mft[eval]"]' in pyproject
    assert VLLM_MIN_VERSION == vllm_standin.VERSIONS[0]


def _copy_model(src, dst, **generation_config):
    """A copy of a checkpoint folder with keys added to (or replaced in) its generation_config.json."""
    import shutil

    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **generation_config}))
    return dst


def test_extra_eos_ids_of_the_generation_config_stop_both_backends(monkeypatch, chatml_model_dir, tmp_path):
    """A chat checkpoint lists its end-of-turn token as a second EOS (Llama-3-Instruct, Qwen-Instruct): vLLM
    adds it to stop_token_ids, so the request ends there even when no stop string names it. Without
    `<|im_end|>` among the stops, the first prompt stops on its 7th token (as it does with the stop string)."""
    vllm_standin.install(monkeypatch, gpus=1)
    from mft.eval.backends.vllm import VLLMBackend

    tokenizer = HFBackend(str(chatml_model_dir)).tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chat = _copy_model(chatml_model_dir, tmp_path / "chat", eos_token_id=[tokenizer.eos_token_id, im_end])
    stops = ["Question:", "\n\n"]
    plain = HFBackend(str(chatml_model_dir)).generate(PROMPTS[:1], stops, 24)[0]
    assert "<|im_end|>" in plain.text  # the model does reach the token
    vllm = VLLMBackend(str(chat))
    a = vllm.generate(PROMPTS, stops, 24)
    b = HFBackend(str(chat), batch_size=2).generate(PROMPTS, stops, 24)
    assert [(g.text, g.num_tokens) for g in a] == [(g.text, g.num_tokens) for g in b]
    assert a[0].num_tokens == 7 and "<|im_end|>" not in a[0].text and plain.text.startswith(a[0].text)
    assert vllm.stop_token_ids == sorted([tokenizer.eos_token_id, im_end])
    (out,) = vllm.llm.generate([vllm.llm.calls[0]["prompts"][0]], vllm.sampling_params(stops, 24))
    assert out.outputs[0].stop_reason == im_end and out.outputs[0].token_ids[-1] == im_end


def test_the_checkpoints_sampling_settings_do_not_change_greedy_decoding(monkeypatch, chatml_model_dir, tmp_path):
    """generation_config.json's repetition_penalty / no_repeat_ngram_size (Qwen2.5-Instruct ships 1.05) are
    ignored by vLLM when it is given SamplingParams, and olmes gives greedy ones: both backends decode plain
    greedy. `model.generate` with the checkpoint's settings gives other text (so the test can fail)."""
    vllm_standin.install(monkeypatch, gpus=1)
    from mft.eval.backends.vllm import VLLMBackend

    penalised = _copy_model(chatml_model_dir, tmp_path / "penalised", repetition_penalty=1.3,
                            no_repeat_ngram_size=2)
    prompts = [p.replace("<|im_end|>", "") for p in PROMPTS]
    plain = HFBackend(str(chatml_model_dir), batch_size=2).generate(prompts, ["Question:"], 24)
    hf = HFBackend(str(penalised), batch_size=2)
    assert [(g.text, g.num_tokens) for g in hf.generate(prompts, ["Question:"], 24)] == \
        [(g.text, g.num_tokens) for g in plain]
    vllm = VLLMBackend(str(penalised)).generate(prompts, ["Question:"], 24)
    assert [(g.text, g.num_tokens) for g in vllm] == [(g.text, g.num_tokens) for g in plain]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(penalised)  # its own generation_config.json applies
    ids = torch.tensor([encode_prompts(hf.tokenizer, prompts[:1], 2000)[0]])
    with torch.inference_mode():
        own = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)[0, ids.shape[1]:]
    assert decode_continuation(hf.tokenizer, ids[0], own) != plain[0].text


def test_an_incomplete_utf8_character_at_the_end_is_held_back(chatml_model_dir):
    """vLLM's DecodeStream holds back text ending in an incomplete character and never emits it when the
    request ends there; the shared rule leaves it out too (it used to end the text with U+FFFD)."""
    tokenizer = HFBackend(str(chatml_model_dir)).tokenizer
    prompt = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    words = tokenizer(" 12 apples", add_special_tokens=False)["input_ids"]
    first, second = tokenizer.convert_tokens_to_ids(["Ã", "©"])  # the bytes of "é" (0xC3 0xA9), byte-level
    params = vllm_standin.SamplingParams(max_tokens=50, skip_special_tokens=False, spaces_between_special_tokens=False)
    for new, expected in [(words + [first], " 12 apples"), (words + [first, second], " 12 applesé"),
                          (words + [first, first], " 12 apples"), ([first], ""),
                          ([first] + words, "\ufffd 12 apples")]:
        standin = vllm_standin.detokenize(tokenizer, prompt, new, params, None)[0]
        assert decode_continuation(tokenizer, prompt, new) == standin == expected, new


def test_max_model_len_above_the_models_context(monkeypatch, capsys, chatml_model_dir, tmp_path):
    """The tiny model has 512 positions. vLLM refuses a longer max_model_len; both backends cap the
    protocol's default 2048 at 512 (logged) and refuse a longer explicit one before loading."""
    vllm_standin.install(monkeypatch, gpus=1)
    from mft.eval.backends.vllm import VLLMBackend

    with pytest.raises(ValueError, match=r"User-specified max_model_len \(2048\) is greater than the derived"):
        vllm_standin.LLM(str(chatml_model_dir), max_model_len=2048)
    vllm = VLLMBackend(str(chatml_model_dir))
    assert vllm.max_model_len == 512 and vllm.llm.init["max_model_len"] == 512
    assert "max_model_len 512: the protocol's 2048 capped at" in capsys.readouterr().err
    assert HFBackend(str(chatml_model_dir)).max_model_len == 512
    message = r"--max-model-len 1024 is longer than .*'s context \(max_position_embeddings = 512 in its config\)"
    vllm_standin.LLM.instances.clear()
    with pytest.raises(MftError, match=message):
        VLLMBackend(str(chatml_model_dir), max_model_len=1024)
    with pytest.raises(MftError, match=message):
        HFBackend(str(chatml_model_dir), max_model_len=1024)
    assert vllm_standin.LLM.instances == []
    from mft.cli import main

    assert main(["eval", "--model", str(chatml_model_dir), "--task", "gsm8k", "--data-dir", "packaged",
                 "--max-model-len", "1024", "--output-dir", str(tmp_path / "out")]) == 1
    assert re.search("mft eval: error: " + message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_auto_dtype_on_a_gpu_without_bfloat16(monkeypatch, capsys, chatml_model_dir, tmp_path):
    """A V100 (compute capability 7.0): vLLM refuses bfloat16, and its own auto picks float16, so the project
    does too; a checkpoint whose config has no dtype is read from its weights (bfloat16 here)."""
    vllm_standin.install(monkeypatch, gpus=1, capability=(7, 0))
    from mft.eval.backends.vllm import VLLMBackend

    with pytest.raises(ValueError, match="Bfloat16 is only supported on GPUs with compute capability of at least 8.0"):
        vllm_standin.LLM(str(chatml_model_dir), dtype="bfloat16")
    assert VLLMBackend(str(chatml_model_dir)).llm.init["dtype"] == "float16"
    with pytest.raises(MftError, match="--dtype bfloat16 needs a GPU of compute capability 8.0"):
        VLLMBackend(str(chatml_model_dir), dtype="bfloat16")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(chatml_model_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(chatml_model_dir).save_pretrained(bf16)
    config = json.loads((bf16 / "config.json").read_text())
    assert config.pop("dtype", None) == "bfloat16" or config.pop("torch_dtype", None) == "bfloat16"
    (bf16 / "config.json").write_text(json.dumps(config))
    vllm_standin.install(monkeypatch, gpus=1, capability=(9, 0))
    capsys.readouterr()
    assert VLLMBackend(str(bf16)).llm.init["dtype"] == "bfloat16"  # was float32 -> bfloat16 by assumption
    assert "checkpoint: bfloat16 from its weights" in capsys.readouterr().err
    vllm_standin.install(monkeypatch, gpus=1, capability=(7, 5))
    assert VLLMBackend(str(bf16)).llm.init["dtype"] == "float16"


def test_errors_come_before_anything_is_created(monkeypatch, capsys, chatml_model_dir, tmp_path):
    """Each of these used to fail after loading the model (or with a traceback), leaving an empty folder."""
    import sys

    from mft.cli import main

    ifeval = tmp_path / "data" / "ifeval"
    ifeval.mkdir(parents=True)
    rows = [{"key": 1, "prompt": "Write a haiku.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
            {"key": 2, "prompt": "", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}]
    (ifeval / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cases = [
        (["--task", "gsm8k", "--data-dir", "packaged", "--max-model-len", "512"],
         "max_model_len 512 leaves no room for a prompt with max_gen_toks 512"),
        (["--task", "gsm8k", "--data-dir", "packaged", "--max-model-len", "-5"],
         "--max-model-len must be a positive number of tokens, got -5"),
        (["--task", '{"task_name": "ifeval", "generation_kwargs": {"max_gen_toks": 16}}', "--data-dir",
          str(tmp_path / "data")],
         r"ifeval: the prompt of doc_id\(s\) \[1\] is empty"),
        (["--task", '{"task_name": "gsm8k", "generation_kwargs": {"max_gen_toks": 0}}', "--data-dir", "packaged"],
         "gsm8k: max_gen_toks must be a positive integer, got 0"),
        (["--task", "gsm8k", "--data-dir", "packaged", "--model-type", "vllm"],
         r"--model-type vllm but vLLM is not installed"),
        (["--task", "gsm8k", "--data-dir", "packaged", "--tensor-parallel-size", "2"],
         r"--tensor-parallel-size only apply to the vllm backend, not hf \(--model-type auto resolved to hf "
         r"\(vLLM is not installed\)\)"),
    ]
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed (find_spec raises ValueError for None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "vllm" else _find_spec(name, *a))
    for flags, message in cases:
        out = tmp_path / "out"
        assert main(["eval", "--model", str(chatml_model_dir), "--output-dir", str(out), *flags]) == 1, flags
        assert re.search("mft eval: error: .*" + message, capsys.readouterr().err), flags
        assert not out.exists(), flags


def test_hf_records_the_resolved_dtype_and_device(chatml_model_dir, shared_data, tmp_path):
    """`--dtype auto` means float32 on a CPU and bfloat16 on most GPUs: reuse compares what ran."""
    from mft.cli import main

    task = json.dumps({"task_name": "gsm8k", "num_shots": 1, "generation_kwargs": {"max_gen_toks": 4}})
    assert main(["eval", "--model", str(chatml_model_dir), "--task", task, "--model-type", "hf", "--limit", "1",
                 "--data-dir", str(shared_data), "--output-dir", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "metrics.json").read_text())["model_config"]
    assert (config["dtype"], config["device"], config["max_model_len"]) == ("float32", "cpu", 512)


def test_the_olmes_route_refuses_mft_settings():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bash/evaluation/llama2-7b_if.sh"
    result = subprocess.run(["bash", str(script), "masktune_x"], capture_output=True, text=True,
                            env={**os.environ, "DRY_RUN": "1", "EVAL_HARNESS": "olmes", "TENSOR_PARALLEL_SIZE": "4"})
    assert result.returncode == 1 and result.stdout == ""
    assert "error: TENSOR_PARALLEL_SIZE is an mft eval setting; with EVAL_HARNESS=olmes pass olmes' own flags" \
        in result.stderr


def test_tiny_models_stop_only_on_the_tokenizers_eos(chatml_model_dir):
    """mft.tiny's config EOS used to be id 2 (`<unk>` for its tokenizer): vLLM would stop on `<unk>` too."""
    from mft.eval.backends.model_info import stop_token_ids

    tokenizer = HFBackend(str(chatml_model_dir)).tokenizer
    assert stop_token_ids(str(chatml_model_dir), tokenizer) == [tokenizer.eos_token_id] == [1]
