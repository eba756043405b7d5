"""EVLGen-image: frozen ViT -> ln_vision -> Linear -> TomeFormer -> Linear -> frozen LLM.

``connector`` picks what sits between the two Linears (README, "The r trade-off"): ``tomeformer``
(the paper), ``avgpool`` (the ViT tokens average-pooled to the merging schedule's token count, then
the same BERT layers without merging) or ``mlp`` (LLaVA's Linear-GELU-Linear on every ViT token).

One implementation serves every LLM; ``evlgen_opt`` and ``evlgen_vicuna`` differ only in
their model-type table. Trained in one stage with the LLM's captioning loss (method.md §2), or,
with ``scst: true``, with self-critical sequence training (``models/scst.py``: the config takes the
``SCSTConfig`` keys, the model is an ``SCSTMixin``); a checkpoint of one loss loads into the other.
"""
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from torch import nn
from transformers import BertConfig

from lavis_evlgen.assets.resolver import resolve_pretrained
from lavis_evlgen.common.checkpoint import ForeignLayout
from lavis_evlgen.common.paths import model_type_configs
from lavis_evlgen.models import authors_layout
from lavis_evlgen.models.merge import capped_merges, merged_token_counts, parse_r
from lavis_evlgen.models.prefix_lm import PrefixLM, PrefixLMConfig
from lavis_evlgen.models.scst import SCSTConfig, SCSTMixin
from lavis_evlgen.models.token_pool import avg_pool_tokens, pooled_shape
from lavis_evlgen.models.tomeformer import TomeFormer
from lavis_evlgen.models.vision import load_base_model

# The connector options: the paper's, and the two a practitioner would try first (README, "The r trade-off").
CONNECTORS = ("tomeformer", "avgpool", "mlp")


@dataclass
class EVLGenConfig(SCSTConfig, PrefixLMConfig):
    """Every option of an EVLGen model, with the paper's OPT-2.7b defaults (method.md §2), and
    the SCST loss mode's keys (``SCSTConfig``: ``scst`` false by default).

    This is the one place defaults live; ``from_config`` only filters and validates keys.
    """

    # TomeFormer connector, initialised from a BERT checkpoint. avgpool: pool to the token count
    # tome_r would merge to, then the same BERT layers with r=0 (merge_mode, prop_attn unused).
    # mlp: vit_proj -> GELU -> llm_proj at connector_init's width (the BERT's layers and tome_r unused).
    connector: str = "tomeformer"
    connector_init: str = "bert-base-uncased"
    num_layers: int = 12
    tome_r: Any = 19
    merge_mode: str = "mean"
    prop_attn: bool = False
    # Optional image-text contrastive term against a frozen sentence encoder (off in the paper)
    beta: float = 0.0
    sentence_encoder: str = "princeton-nlp/sup-simcse-bert-base-uncased"
    contrastive_temp: float = 0.07

    @classmethod
    def from_dict(cls, cfg) -> "EVLGenConfig":
        config = super().from_dict(cfg)
        r = config.tome_r
        if r is not None and not isinstance(r, int):
            # YAML has no tuples: [r, inflection] with a float inflection is ToMe's (r, inflection).
            r = list(r)
            config.tome_r = tuple(r) if len(r) == 2 and isinstance(r[1], float) else r
        return config

    def __post_init__(self):
        super().__post_init__()
        if self.connector not in CONNECTORS:
            raise ValueError(f"EVLGenConfig: connector={self.connector!r} is not one of {CONNECTORS}")
        if self.beta > 0 and self.connector == "mlp":
            raise ValueError("EVLGenConfig: beta > 0 needs a BERT connector's CLS token (connector tomeformer or "
                             "avgpool); connector mlp has none")


class EVLGen(SCSTMixin, PrefixLM):
    """EVLGen-image. Subclasses register a name and a model-type table.

    Samples: ``image`` [B, 3, H, W]; ``text_input`` list[str] (captions for training,
    questions for VQA); optional ``prompt`` (str or list[str]); ``image_id`` for SCST.
    ``forward`` is ``SCSTMixin``'s: the SCST loss when training with ``scst: true``, else
    ``PrefixLM.forward`` (the captioning loss, plus the contrastive term of ``supervised_loss``).
    """

    CONFIG_CLASS = EVLGenConfig

    def __init__(self, config: EVLGenConfig):
        super().__init__(config)
        if config.beta > 0:
            self._build_contrastive_head(config)

    def build_connector(self, config: EVLGenConfig, vision_width: int) -> int:
        init = resolve_pretrained(config.connector_init, config_key="connector_init")
        if config.connector == "mlp":
            # LLaVA-1.5's projector (Linear-GELU-Linear; Liu et al. 2023, "Improved Baselines"):
            # vit_proj and llm_proj are its Linears, so its widths are those of the other options.
            width = BertConfig.from_pretrained(init).hidden_size
            self.vit_proj = nn.Linear(vision_width, width)
            self.connector = nn.GELU()
            return width
        self.connector = TomeFormer.from_pretrained(
            init,
            num_layers=config.num_layers,
            tome_r=config.tome_r if config.connector == "tomeformer" else 0,
            merge_mode=config.merge_mode,
            prop_attn=config.prop_attn,
        )
        # The ToMe schedule's r per layer: TomeFormer's merges, or what avgpool's token count matches.
        self.merge_schedule = parse_r(self.connector.num_layers, config.tome_r)
        # ViT width -> connector width (the authors' VL_proj). Not BLIP-2's vision_proj, its ITC head.
        self.vit_proj = nn.Linear(vision_width, self.connector.hidden_size)
        return self.connector.hidden_size

    def schedule_token_counts(self, num_vision_tokens: int) -> list[int]:
        """Token counts through the merge schedule: [num_vision_tokens, after layer 1, ..., soft prompts]."""
        return merged_token_counts(num_vision_tokens, self.merge_schedule, protected=1)

    def foreign_layout(self, checkpoint: dict) -> ForeignLayout | None:
        """The authors' released checkpoints (``liptome_*``) load by their names (``models/authors_layout.py``)."""
        return authors_layout.translate(checkpoint, self)

    def soft_prompt_count(self, num_vision_tokens: int) -> int:
        """Soft prompts per image: the merge schedule's end count (tomeformer, avgpool) or every ViT token
        (mlp); a warning when an r exceeds half of a layer's tokens, where ToMe's matching caps it
        (README, "Reliability")."""
        if self.config.connector == "mlp":
            return num_vision_tokens
        counts = self.schedule_token_counts(num_vision_tokens)
        capped = capped_merges(num_vision_tokens, self.merge_schedule, protected=1)
        if capped:
            logging.warning("tome_r: %s; a layer merges at most half of its tokens (CLS aside), so r is capped: "
                            "tokens %s", ", ".join(f"layer {k} asks r={r} of {counts[k - 1]} tokens, merges {m}"
                                                   for k, r, m in capped),
                            " -> ".join(map(str, counts)))
        if self.config.connector == "avgpool":
            pooled_shape(num_vision_tokens, counts[-1])  # a count that does not tile the patch grid fails here
        return counts[-1]

    def connect(self, vision_tokens: torch.Tensor):
        """vision_tokens [B, T, C_vit] -> (tokens [B, N, C], the connector's output: TomeFormerOutput, None for mlp);
        N = soft_prompt_count(T)."""
        if self.config.connector == "mlp":
            return self.connector(self.vit_proj(vision_tokens)), None
        if self.config.connector == "avgpool":
            # Pooling before vit_proj is the same as after (an affine map commutes with a mean), and cheaper.
            vision_tokens = avg_pool_tokens(vision_tokens, self.schedule_token_counts(vision_tokens.shape[1])[-1])
        connector_out = self.connector(self.vit_proj(vision_tokens))
        return connector_out.last_hidden_state, connector_out

    def _build_contrastive_head(self, config: EVLGenConfig):
        from transformers import AutoTokenizer

        path = resolve_pretrained(config.sentence_encoder, config_key="sentence_encoder")
        self.sentence_encoder = load_base_model(path).requires_grad_(False)
        self.sentence_tokenizer = AutoTokenizer.from_pretrained(path)
        self.contrastive_proj = nn.Linear(self.connector.hidden_size, self.sentence_encoder.config.hidden_size)
        self.contrastive_logit_scale = nn.Parameter(torch.tensor(1.0 / config.contrastive_temp).log())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.beta > 0:
            self.sentence_encoder.eval()
        return self

    def supervised_loss(self, prefix: torch.Tensor, connector_out, samples: dict) -> dict:
        """LM loss on ``prompt + caption + "\\n"`` after the soft prompts (labels -100 there), plus
        ``beta`` times the contrastive term when ``beta > 0``.

        Returns:
            {"loss": scalar, "loss_lm": scalar[, "loss_itc": scalar]}
        """
        out = self.caption_loss(prefix, samples)
        if self.config.beta > 0:
            out["loss_itc"] = self._contrastive_loss(connector_out.last_hidden_state[:, 0], samples["text_input"])
            out["loss"] = out["loss_lm"] + self.config.beta * out["loss_itc"]
        return out

    def _contrastive_loss(self, image_cls: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Symmetric InfoNCE between TomeFormer CLS [B, C] and frozen sentence embeddings (in-batch negatives)."""
        tok = self.sentence_tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
        with torch.no_grad():
            text_emb = self.sentence_encoder(**tok.to(image_cls.device)).last_hidden_state[:, 0]
        image_emb = F.normalize(self.contrastive_proj(image_cls), dim=-1)
        text_emb = F.normalize(text_emb.float(), dim=-1)
        logits = self.contrastive_logit_scale.exp() * image_emb @ text_emb.t()
        target = torch.arange(len(texts), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


@registry.register_model("evlgen_opt")
class EVLGenOPT(EVLGen):
    """EVLGen with an OPT decoder (the paper's main model)."""

    PRETRAINED_MODEL_CONFIG_DICT = model_type_configs("evlgen_opt", ["pretrain_opt2.7b", "pretrain_opt6.7b", "tiny"])


@registry.register_model("evlgen_vicuna")
class EVLGenVicuna(EVLGen):
    """EVLGen with a LLaMA-family decoder (Vicuna-7b in the paper; any LLaMA-architecture LM works)."""

    PRETRAINED_MODEL_CONFIG_DICT = model_type_configs("evlgen_vicuna", ["pretrain_vicuna7b", "mini", "mini_smollm2", "tiny"])
