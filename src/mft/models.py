"""Loading a checkpoint as the language model `transformers` builds for it, plain or multimodal.

Most decoder checkpoints load with `AutoModelForCausalLM`. Image-text checkpoints (Gemma 3 4B+, Llama 4,
Mistral 3, LLaVA-style) are built by `AutoModelForImageTextToText`; some of them (Mistral 3, LLaVA) are not
known to `AutoModelForCausalLM` at all, and others (Llama 4) load there as a text-only model that drops the
vision weights. `auto_class(config)` picks the class `transformers` registers for the whole checkpoint, so
training, apply and evaluation (text-only prompts) see the same module names `from_pretrained` gives.
"""

from __future__ import annotations

from mft.errors import MftError


def is_multimodal(config) -> bool:
    """True when the language model is a sub-config (`config.get_text_config()` is another object)."""
    return config.get_text_config() is not config


def auto_class(config):
    """`AutoModelForImageTextToText` for configs it registers that are multimodal, else
    `AutoModelForCausalLM`; an `MftError` naming the config class when neither knows it."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None)
    if is_multimodal(config) and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "auto_map", None):
        return AutoModelForCausalLM
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    raise MftError(f"{type(config).__name__} (model_type {model_type!r}) is neither a causal language model nor an "
                   "image-text-to-text model that transformers can build; mft masks decoder language models")


def load_pretrained(path, **kwargs):
    """`from_pretrained(path, **kwargs)` with the class `auto_class` picks for the checkpoint's config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False),
                                        revision=kwargs.get("revision"))
    return auto_class(config).from_pretrained(path, **kwargs)


def skeleton_from_config(config, trust_remote_code: bool = False):
    """The model `config` describes, built on the meta device: module names and shapes, no memory, no weight
    file read. `trust_remote_code`: allow the model class of a config that names its own code (`auto_map`)."""
    import torch

    with torch.device("meta"):
        return auto_class(config).from_config(config, trust_remote_code=trust_remote_code)
