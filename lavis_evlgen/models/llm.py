"""LLM factory: any Hugging Face causal LM (OPT, LLaMA/Vicuna, SmolLM2, ...) and its tokenizer."""
import logging

import torch

from lavis_evlgen.assets.resolver import resolve_pretrained

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_llm(llm_model: str, llm_tokenizer: str | None = None, precision: str = "fp16"):
    """Load the frozen causal LM named by the config key ``llm_model``.

    Args:
        llm_model: hub id, local directory or lavis-evlgen builtin name (see ``assets``).
        llm_tokenizer: where the tokenizer lives when not beside the weights (config key
            ``llm_tokenizer``); defaults to ``llm_model``.
        precision: ``fp16`` | ``bf16`` | ``fp32`` weights.
    Returns:
        (model, tokenizer): the model is an ``AutoModelForCausalLM``; the tokenizer always
        has a pad token (the EOS token when the checkpoint has none: padded positions are
        masked by the attention mask, never by token id).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if precision not in DTYPES:
        raise ValueError(f"llm_precision must be one of {sorted(DTYPES)}, got {precision!r}")
    model_path = resolve_pretrained(llm_model, config_key="llm_model")
    tokenizer_path = resolve_pretrained(llm_tokenizer, config_key="llm_tokenizer") if llm_tokenizer else model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=DTYPES[precision])
    logging.info("LLM %s: hidden size %d, %s", llm_model, model.config.hidden_size, precision)
    return model, tokenizer
