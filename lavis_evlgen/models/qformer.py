"""Q-Former factory: LAVIS's BLIP-2 Q-Former initialised from any BERT checkpoint.

LAVIS's ``Blip2Base.init_Qformer``/``init_tokenizer`` hard-code ``bert-base-uncased``; these
two functions do the same work from a config key resolved like every other pretrained part,
so the BLIP-2 baselines run offline on the same parts as EVLGen (e.g. MiniLM in the mini world).
"""
import logging

import torch
from torch import nn

from lavis_evlgen.assets.resolver import resolve_pretrained


def _checkpoint_keys(path: str) -> list[str]:
    """Tensor names in the checkpoint directory ``path`` (safetensors or PyTorch bin)."""
    from pathlib import Path

    from safetensors import safe_open

    weights = Path(path) / "model.safetensors"
    if weights.exists():
        with safe_open(str(weights), framework="pt") as f:
            return list(f.keys())
    return list(torch.load(Path(path) / "pytorch_model.bin", map_location="cpu", weights_only=True))


def build_qformer_tokenizer(qformer_init: str):
    """The Q-Former's WordPiece tokenizer (from ``qformer_init``) plus BLIP-2's ``[DEC]`` BOS token."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(resolve_pretrained(qformer_init, config_key="qformer_init"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def qformer_config(
    config, num_query_token: int, vision_width: int, cross_attention_freq: int = 2, num_layers: int | None = None,
    where: str = "the BERT config",
):
    """A BERT config (transformers ``BertConfig``) turned into LAVIS's Q-Former config, in place.

    Adds cross-attention to ``vision_width``-wide image tokens every ``cross_attention_freq`` layers and
    ``num_query_token`` queries; keeps the first ``num_layers`` layers (None: all). ``where`` names the
    checkpoint in errors. Returns the config.
    """
    if num_layers is not None:
        if not 0 < num_layers <= config.num_hidden_layers:
            raise ValueError(f"qformer_num_layers={num_layers}, but {where} has {config.num_hidden_layers} layers")
        config.num_hidden_layers = num_layers
    config.encoder_width = vision_width
    config.add_cross_attention = True
    config.cross_attention_freq = cross_attention_freq
    config.query_length = num_query_token
    return config


def query_branch(bert: nn.Module, query_tokens: torch.Tensor, vision_tokens: torch.Tensor):
    """The Q-Former's query branch, as BLIP-2 stage 2 runs it: queries cross-attend to the image.

    Args:
        bert: the Q-Former's ``.bert`` (LAVIS ``BertModel``); query_tokens: [1, Q, C];
        vision_tokens: [B, T, C_vit] (after ``ln_vision``).
    Returns:
        LAVIS's encoder output; ``last_hidden_state`` is [B, Q, C].
    """
    batch = vision_tokens.shape[0]
    image_atts = torch.ones(vision_tokens.shape[:-1], dtype=torch.long, device=vision_tokens.device)
    return bert(
        query_embeds=query_tokens.expand(batch, -1, -1),
        encoder_hidden_states=vision_tokens,
        encoder_attention_mask=image_atts,
        return_dict=True,
    )


def build_qformer(
    qformer_init: str, num_query_token: int, vision_width: int, cross_attention_freq: int = 2, num_layers: int | None = None
):
    """A BLIP-2 Q-Former: BERT with cross-attention to the image every ``cross_attention_freq`` layers.

    As in LAVIS, the self-attention/FFN weights come from the BERT checkpoint, cross-attention is
    new, and the query branch's FFN (``*_query``) starts as a copy of the text FFN (LAVIS copies
    it in ``Blip2Qformer`` only; here both stages get it, so "one-stage" BLIP-2 starts from the
    same weights stage 1 does).

    Args:
        qformer_init: config key ``qformer_init``: BERT hub id, local path or builtin.
        num_query_token: Q learned queries.
        vision_width: C_vit, the width of the image tokens the queries attend to.
        num_layers: keep only the first layers of the checkpoint (None: all).
    Returns:
        (qformer, query_tokens): LAVIS's ``BertLMHeadModel`` and a Parameter [1, Q, C].
    """
    from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

    path = resolve_pretrained(qformer_init, config_key="qformer_init")
    config = qformer_config(BertConfig.from_pretrained(path), num_query_token, vision_width, cross_attention_freq,
                            num_layers, where=qformer_init)
    qformer = BertLMHeadModel.from_pretrained(path, config=config)
    # LAVIS ties the LM head's decoder bias to a zero-initialised ``predictions.bias``. For a
    # checkpoint without an LM head (MiniLM), transformers 4.51 leaves that bias uninitialised
    # (``_init_weights`` skips bare parameters) and the decoder's copy on the meta device.
    predictions = qformer.cls.predictions
    if not any(key.startswith("cls.") for key in _checkpoint_keys(path)):
        with torch.no_grad():
            predictions.bias.zero_()
    predictions.decoder.bias = predictions.bias
    state = qformer.state_dict()
    with torch.no_grad():
        for name, param in qformer.named_parameters():
            if "_query" in name:
                param.copy_(state[name.replace("_query", "")])
    query_tokens = nn.Parameter(torch.zeros(1, num_query_token, config.hidden_size))
    query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
    logging.info("Q-Former from %s: %d layers, width %d, %d queries", qformer_init, config.num_hidden_layers,
                 config.hidden_size, num_query_token)
    return qformer, query_tokens
