"""Tiny random models of every family issue 10 lists, from configs (no downloads): 2 layers, hidden 32, 4 experts.

`FAMILY_CONFIGS[name]()` gives the config; `build(name)` the model, built with the class `from_pretrained` uses
for it (`mft.models.auto_class`). `EXPECTED[name]` is what `masked_layers=[1]` must select per kind, below
`<layers prefix>.1.`, and `ROUTERS[name]` what must stay untouched.
"""

from __future__ import annotations

import torch
import transformers as T

H, VOCAB = 32, 128


def _text(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, max_position_embeddings=64, head_dim=8, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, tie_word_embeddings=False)
    base.update(kw)
    return base


_VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=16,
               patch_size=8)

FAMILY_CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_text()),
    "qwen3": lambda: T.Qwen3Config(**_text()),
    "gemma3_text": lambda: T.Gemma3TextConfig(**_text()),
    "gemma3": lambda: T.Gemma3Config(text_config=_text(), vision_config=_VISION, mm_tokens_per_image=4,
                                     image_token_index=5, boi_token_index=6, eoi_token_index=7),
    "mistral3": lambda: T.Mistral3Config(text_config=dict(model_type="mistral", **_text()), image_token_index=5,
                                         vision_config=dict(model_type="pixtral", head_dim=8, **_VISION)),
    "llama4_text": lambda: T.Llama4TextConfig(**_text(num_local_experts=4, intermediate_size_mlp=48,
                                                      interleave_moe_layer_step=1)),
    "llama4": lambda: T.Llama4Config(
        text_config=_text(num_local_experts=4, intermediate_size_mlp=48, interleave_moe_layer_step=1),
        vision_config=dict(vision_output_dim=16, projector_input_dim=16, projector_output_dim=16, **_VISION),
        image_token_index=5, boi_token_index=6, eoi_token_index=7),
    "mixtral": lambda: T.MixtralConfig(**_text(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_text(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                  shared_expert_intermediate_size=24)),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_text(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    "olmoe": lambda: T.OlmoeConfig(**_text(num_experts=4, num_experts_per_tok=2)),
    "granitemoe": lambda: T.GraniteMoeConfig(**_text(num_local_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": lambda: T.DeepseekV3Config(**_text(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8, n_group=1, topk_group=1, rope_scaling=None, head_dim=4)),
    "gpt_oss": lambda: T.GptOssConfig(**_text(num_local_experts=4, num_experts_per_tok=2, rope_scaling=None)),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=H, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                 eos_token_id=2),
    "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=48, max_position_embeddings=64, bos_token_id=1,
                                        eos_token_id=2),
    "phi3": lambda: T.Phi3Config(**_text()),
    "falcon": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                     bos_token_id=1, eos_token_id=2),
}

_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
_MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# family: (layers prefix, attention weights, MLP weights) of decoder layer 1
EXPECTED = {
    "llama": ("model.layers", _ATTN, _MLP),
    "qwen3": ("model.layers", _ATTN, _MLP),
    "gemma3_text": ("model.layers", _ATTN, _MLP),
    "gemma3": ("model.language_model.layers", _ATTN, _MLP),
    "mistral3": ("model.language_model.layers", _ATTN, _MLP),
    "llama4_text": ("model.layers", _ATTN, ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj",
                                            "feed_forward.shared_expert.gate_proj",
                                            "feed_forward.shared_expert.up_proj",
                                            "feed_forward.shared_expert.down_proj"]),
    "mixtral": ("model.layers", _ATTN, _EXPERTS),
    "qwen2_moe": ("model.layers", _ATTN, _EXPERTS + ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                                     "mlp.shared_expert.down_proj"]),
    "qwen3_moe": ("model.layers", _ATTN, _EXPERTS),
    "olmoe": ("model.layers", _ATTN, _EXPERTS),
    "granitemoe": ("model.layers", _ATTN, ["block_sparse_moe.experts.gate_up_proj",
                                           "block_sparse_moe.experts.down_proj"]),
    "deepseek_v3": ("model.layers", ["self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                                     "self_attn.kv_b_proj", "self_attn.o_proj"],
                    _EXPERTS + ["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
                                "mlp.shared_experts.down_proj"]),
    "gpt_oss": ("model.layers", _ATTN, _EXPERTS),
    "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"]),
    "gpt_neox": ("gpt_neox.layers", ["attention.query_key_value", "attention.dense"],
                 ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "phi3": ("model.layers", ["self_attn.o_proj", "self_attn.qkv_proj"], ["mlp.gate_up_proj", "mlp.down_proj"]),
    "falcon": ("transformer.h", ["self_attention.query_key_value", "self_attention.dense"],
               ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
}
EXPECTED["llama4"] = ("language_model.model.layers",) + EXPECTED["llama4_text"][1:]
# routers / gates of layer 1 that no subnet_mode may touch
ROUTERS = {"mixtral": ["mlp.gate"], "qwen2_moe": ["mlp.gate", "mlp.shared_expert_gate"], "qwen3_moe": ["mlp.gate"],
           "olmoe": ["mlp.gate"], "granitemoe": ["block_sparse_moe.router"], "deepseek_v3": ["mlp.gate"],
           "gpt_oss": ["mlp.router"], "llama4_text": ["feed_forward.router"], "llama4": ["feed_forward.router"]}
FAMILIES = tuple(FAMILY_CONFIGS)


def build(family: str, seed: int = 0, vocab_size: int | None = None):
    from mft.models import auto_class

    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family]()
    if vocab_size is not None:
        config.get_text_config().vocab_size = vocab_size
    model = auto_class(config).from_config(config)
    return model.eval()
